"""An Output that 'dies' around its n-th append: the real outbox, then a power cut."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.outbox import AppendResult, Cursor, Outbox, Quarantined
from agent.outbox_keys import KeySet
from agent.records import Record


class PowerCut(Exception):
    """Stands for the process dying."""


class CrashingOutput:
    """The real outbox, but the process 'dies' just before or just after the n-th append
    commits (``after_commit``): what a kill -9 at that moment leaves behind."""

    def __init__(self, box: Outbox, at: int, after_commit: bool) -> None:
        self.box, self.at, self.after_commit, self.calls = box, at, after_commit, 0

    async def append(
        self,
        records: Sequence[Record],
        cursor: Cursor | Sequence[Cursor] | None = None,
        *,
        dedupe: bool = False,
        quarantine: Sequence[Quarantined] = (),
    ) -> AppendResult:
        self.calls += 1
        if self.calls == self.at and not self.after_commit:
            raise PowerCut
        result = await self.box.append(records, cursor, dedupe=dedupe, quarantine=quarantine)
        if self.calls == self.at:
            raise PowerCut
        return result

    async def cursor(self, source: str, key: str) -> Any | None:
        return await self.box.cursor(source, key)

    def key_set(self, source: str, name: str) -> KeySet:
        return self.box.key_set(source, name)
