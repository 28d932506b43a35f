"""THE test double of a source's Output (agent.sources.base.Output): one class, every switch.

A :class:`TestOutput` is the real outbox (``TestOutput(box)``), or memory when there is
no outbox (``TestOutput()``: records and quarantined inputs kept in lists, cursors in a
dict). On top of either it can

* hold appends at a gate (``block()`` / ``unblock()``): what a full outbox does, for
  backpressure cases; ``waiting`` is set while an append waits there;
* fail appends (``fail(...)``): the next one, the n-th, or the next one whose records
  match a predicate; before the commit (nothing stored) or after it (stored, but the
  caller hears an error: a power cut between the commit and the acknowledgement);
* return like Python 3.11's ``asyncio.wait_for`` can at a cancel (``swallow_cancel``):
  the append completes and returns and the cancellation is dropped.

It counts appends begun, committed, and in flight at once (``max_in_flight``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.errors import OutboxWriteError
from agent.outbox import AppendResult, Cursor, Outbox, Quarantined
from agent.outbox_keys import KeySet
from agent.records import Record
from tests.helpers.cancel import swallowing


class PowerCut(BaseException):
    """Stands for the process dying (``fail(PowerCut())``): a BaseException, so that no
    ``except Exception`` in a source handles it as a failure to retry, as nothing runs on
    in a dead process."""


@dataclass
class _Fault:
    error: BaseException
    at: int | None  # the n-th append (1-based), or None: the next matching one
    when: Callable[[Sequence[Record]], bool] | None
    after_commit: bool

    def hits(self, call: int, records: Sequence[Record]) -> bool:
        if self.at is not None and call != self.at:
            return False
        return self.when is None or self.when(records)


class TestOutput:
    """The Output contract for tests; see the module docstring."""

    __test__ = False  # not a pytest test class

    def __init__(self, box: Outbox | None = None) -> None:
        self.box = box
        self.records: list[Record] = []
        """Every record of every committed append, in order (both modes)."""
        self.quarantined: list[Quarantined] = []
        """Every quarantined input of every committed append, in order (both modes)."""
        self.cursors_by_key: dict[tuple[str, str], Any] = {}
        self.calls = 0
        """Appends begun."""
        self.committed = 0
        """Appends committed."""
        self.in_flight = 0
        self.max_in_flight = 0
        self.changed = asyncio.Event()
        """Set after every committed append (clear it to wait for the next)."""
        self.waiting = asyncio.Event()
        """Set while an append waits at the closed gate."""
        self.started = asyncio.Event()
        """Set once a cancel-swallowing append is under way."""
        self.swallow_cancel = False
        self._gate = asyncio.Event()
        self._gate.set()
        self._faults: list[_Fault] = []

    # ------------------------------------------------------------------ switches

    def block(self) -> None:
        """Appends from now on wait (a full outbox) until :meth:`unblock`."""
        self._gate.clear()

    def unblock(self) -> None:
        """Let waiting and later appends through."""
        self._gate.set()
        self.waiting.clear()

    def fail(
        self,
        error: BaseException | None = None,
        *,
        at: int | None = None,
        when: Callable[[Sequence[Record]], bool] | None = None,
        after_commit: bool = False,
    ) -> None:
        """Make one append fail with ``error`` (default: a full disk): the ``at``-th
        append, or else the next one whose records satisfy ``when`` (or just the next).
        ``after_commit``: the records are committed first (the caller still hears the
        error)."""
        err = error if error is not None else OutboxWriteError("simulated: disk full")
        self._faults.append(_Fault(err, at, when, after_commit))

    def fault_spent(self) -> bool:
        """Whether every :meth:`fail` set up so far has struck."""
        return not self._faults

    # ------------------------------------------------------------------ Output

    async def append(
        self,
        records: Sequence[Record],
        cursor: Cursor | Sequence[Cursor] | None = None,
        *,
        dedupe: bool = False,
        quarantine: Sequence[Quarantined] = (),
    ) -> AppendResult:
        """Commit like the outbox does, through the switches above."""
        self.calls += 1
        call = self.calls
        fault = next((f for f in self._faults if f.hits(call, records)), None)
        if fault is not None:
            self._faults.remove(fault)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if not self._gate.is_set():
                self.waiting.set()
                await self._gate.wait()
            if fault is not None and not fault.after_commit:
                raise fault.error

            async def commit() -> AppendResult:
                return await self._commit(records, cursor, dedupe, quarantine)

            result: AppendResult
            if self.swallow_cancel:
                result = await swallowing(commit, self.started)
            else:
                result = await commit()
            if fault is not None:
                raise fault.error
            return result
        finally:
            self.in_flight -= 1

    async def _commit(
        self,
        records: Sequence[Record],
        cursor: Cursor | Sequence[Cursor] | None,
        dedupe: bool,
        quarantine: Sequence[Quarantined],
    ) -> AppendResult:
        if self.box is not None:
            result = await self.box.append(records, cursor, dedupe=dedupe, quarantine=quarantine)
        else:
            result = AppendResult(stored=len(records))
            for c in [cursor] if isinstance(cursor, Cursor) else cursor or ():
                if type(c) is Cursor:  # KeyMarks (reconciliation) need the outbox
                    self.cursors_by_key[(c.source, c.key)] = c.value
        self.records += records
        self.quarantined += quarantine
        self.committed += 1
        self.changed.set()
        return result

    async def cursor(self, source: str, key: str) -> Any | None:
        """The last committed cursor value (the outbox's, or this double's)."""
        if self.box is not None:
            return await self.box.cursor(source, key)
        return self.cursors_by_key.get((source, key))

    async def cursors(self, source: str) -> dict[str, Any]:
        """Every committed cursor of ``source``, by key."""
        if self.box is not None:
            return await self.box.cursors(source)
        return {key: value for (src, key), value in self.cursors_by_key.items() if src == source}

    def key_set(self, source: str, name: str) -> KeySet:
        """The outbox's key set (memory mode has none)."""
        assert self.box is not None, "key sets need the real outbox: TestOutput(box)"
        return self.box.key_set(source, name)

    # ------------------------------------------------------------------ reads

    def readings(self, point: str) -> list[Record]:
        """Committed records of one point id (``remote_id``)."""
        return [r for r in self.records if r.remote_id == point]

    def latest(self) -> dict[str, Any]:
        """Latest committed value per point id of meter readings."""
        return {
            r.remote_id: r.data["value"] for r in self.records if r.entity_type == "meter_reading"
        }
