"""One pipeline from a source to the outbox: rules, the append with its cursors, counts.

Every source appends through a :class:`Pipeline` (the supervisor builds it in
:func:`run_source`). With rules, it evaluates them on the records and appends the
records, the rule records they caused, the source's cursor and the rules' cursors in ONE
outbox append, so a rule event commits (or not) together with the reading that caused
it. Appends that change rule state are serialized (evaluation order is commit order);
all others go straight to the outbox, so group commit is unaffected. Every commit, the
rules timer's included, is reported to ``on_commit`` (the supervisor's per-source
counters for status and metrics).

What a source does before it appends (its batching, report-by-exception) stays in the
source: it depends on the input (a poll, a message, a chunk of rows).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from agent.outbox import AppendResult, Cursor, Quarantined
from agent.records import Record
from agent.rules.config import RuleConfig
from agent.rules.engine import Evaluation, RuleEngine
from agent.sources.base import Output, Source

if TYPE_CHECKING:
    from agent.outbox_keys import KeySet

log = structlog.get_logger("agent.pipeline")

TICK_MAX = 5.0
TICK_MIN = 0.05

OnCommit = Callable[[AppendResult, int], None]
"""Told of every committed append: its result and how many inputs it quarantined."""


def _cursors(cursor: Cursor | Sequence[Cursor] | None) -> list[Cursor]:
    if cursor is None:
        return []
    return [cursor] if isinstance(cursor, Cursor) else list(cursor)


def tick_interval(rules: Sequence[RuleConfig]) -> float:
    """How often the timer runs: a quarter of the shortest timed condition, at most 5 s."""
    spans = [r.after for r in rules if r.after] + [r.for_ for r in rules if r.for_]
    spans += [r.per for r in rules if r.type == "rate"]
    return max(TICK_MIN, min([TICK_MAX, *(s / 4 for s in spans)]))


class Pipeline:
    """The :class:`~agent.sources.base.Output` a source appends through: ``inner`` (the
    outbox) behind the source's rules engine, if it has one."""

    def __init__(
        self,
        inner: Output,
        rules: RuleEngine | None = None,
        *,
        on_commit: OnCommit | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inner = inner
        self.engine = rules
        self.on_commit = on_commit
        self.clock = clock
        self.lock = asyncio.Lock()

    async def append(
        self,
        records: Sequence[Record],
        cursor: Cursor | Sequence[Cursor] | None = None,
        *,
        dedupe: bool = False,
        quarantine: Sequence[Quarantined] = (),
    ) -> AppendResult:
        """Evaluate the rules (if any), then append records, rule records and every
        cursor together; see :meth:`agent.outbox.Outbox.append`."""
        engine = self.engine
        if engine is None:
            return await self._write(records, cursor, dedupe, quarantine)
        ev = engine.observe(list(records), self.clock())
        if not ev.changed:
            result = await self._write(records, cursor, dedupe, quarantine)
            engine.committed(ev)
            return result
        # No await between evaluation and taking the lock: lock order is evaluation order.
        async with self.lock:
            return await self._commit(engine, ev, _cursors(cursor), dedupe, quarantine)

    async def _write(
        self,
        records: Sequence[Record],
        cursor: Cursor | Sequence[Cursor] | None,
        dedupe: bool,
        quarantine: Sequence[Quarantined],
    ) -> AppendResult:
        result = await self.inner.append(records, cursor, dedupe=dedupe, quarantine=quarantine)
        if self.on_commit is not None:
            self.on_commit(result, len(quarantine))
        return result

    async def _commit(
        self,
        engine: RuleEngine,
        ev: Evaluation,
        cursors: list[Cursor],
        dedupe: bool,
        quarantine: Sequence[Quarantined],
    ) -> AppendResult:
        try:
            result = await self._write(ev.records, [*cursors, *ev.cursors], dedupe, quarantine)
        except asyncio.CancelledError:
            raise  # the commit may still land (the outbox shields it); state stays
        except Exception:
            engine.undo(ev)  # not committed: the redelivered input raises again
            raise
        engine.committed(ev)
        return result

    async def tick(self, now: float | None = None) -> int:
        """Run the rules timer once; returns how many rule records it committed."""
        engine = self.engine
        if engine is None:
            return 0
        ev = engine.tick(self.clock() if now is None else now)
        if not ev.changed:
            return 0
        async with self.lock:
            await self._commit(engine, ev, [], False, ())
        return ev.emitted

    async def run_timer(self) -> None:
        """Tick until cancelled; a failed commit is logged and retried next tick."""
        if self.engine is None:
            return
        interval = tick_interval(list(self.engine.rules.values()))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.tick()
            except Exception as exc:
                log.error("rules_tick_failed", source=self.engine.source, error=repr(exc))

    async def cursor(self, source: str, key: str) -> Any | None:
        """The last committed cursor value (None when never set)."""
        return await self.inner.cursor(source, key)

    async def cursors(self, source: str) -> dict[str, Any]:
        """Every committed cursor of ``source``, by key."""
        return await self.inner.cursors(source)

    def key_set(self, source: str, name: str) -> KeySet:
        """Reads of a source's key set (SQL reconciliation)."""
        return self.inner.key_set(source, name)


async def load_engine(source: Source, rules: list[RuleConfig], out: Output) -> RuleEngine:
    """A rules engine for ``source`` with its durable state read back from the outbox."""
    engine = RuleEngine(source.name, rules, source.ref)
    engine.restore(await out.cursors(source.name), time.time())
    raised = sum(s.raised for states in engine.states.values() for s in states.values())
    log.info("rules_loaded", source=source.name, rules=len(rules), raised=raised)
    return engine


async def run_source(
    source: Source, out: Output, *, rules: bool, on_commit: OnCommit | None = None
) -> None:
    """Run ``source`` (what the supervisor awaits) through its pipeline into ``out``, with
    its rules when its plugin runs rules (``rules``) and its config has any."""
    configured = list(source.config.rules) if rules else []
    engine = await load_engine(source, configured, out) if configured else None
    pipeline = Pipeline(out, engine, on_commit=on_commit)
    if engine is None:
        await source.run(pipeline)
        return
    source.rules = engine  # status shows the rule counters
    timer = asyncio.create_task(pipeline.run_timer(), name=f"rules:{source.name}")
    try:
        await source.run(pipeline)
    finally:
        timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await timer
