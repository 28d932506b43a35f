"""Where rules hook in: a wrapper around a source's Output, and the rules timer.

A source with rules appends through :class:`RuleOutput`. It evaluates the rules on the
records and appends the records, the rule records they caused, the source's cursor and
the rules' cursors in ONE outbox append, so a rule event commits (or not) together with
the reading that caused it. Appends that change rule state are serialized (evaluation
order is commit order); all others pass straight through, so group commit is unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from agent.outbox import AppendResult, Cursor, Quarantined
from agent.records import Record
from agent.rules.config import RuleConfig
from agent.rules.engine import Evaluation, RuleEngine
from agent.sources.base import Output, Source

log = structlog.get_logger("agent.rules")

TICK_MAX = 5.0
TICK_MIN = 0.05


def _cursors(cursor: Cursor | Sequence[Cursor] | None) -> list[Cursor]:
    if cursor is None:
        return []
    return [cursor] if isinstance(cursor, Cursor) else list(cursor)


def tick_interval(rules: Sequence[RuleConfig]) -> float:
    """How often the timer runs: a quarter of the shortest timed condition, at most 5 s."""
    spans = [r.after for r in rules if r.after] + [r.for_ for r in rules if r.for_]
    spans += [r.per for r in rules if r.type == "rate"]
    return max(TICK_MIN, min([TICK_MAX, *(s / 4 for s in spans)]))


class RuleOutput:
    """An Output that runs the rules engine on everything appended through it."""

    def __init__(
        self, inner: Output, engine: RuleEngine, clock: Callable[[], float] = time.time
    ) -> None:
        self.inner = inner
        self.engine = engine
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
        """Evaluate, then append records, rule records and all cursors together."""
        ev = self.engine.observe(list(records), self.clock())
        if not ev.changed:
            result = await self.inner.append(records, cursor, dedupe=dedupe, quarantine=quarantine)
            self.engine.committed(ev)
            return result
        # No await between evaluation and taking the lock: lock order is evaluation order.
        async with self.lock:
            return await self._commit(ev, _cursors(cursor), dedupe, quarantine)

    async def _commit(
        self,
        ev: Evaluation,
        cursors: list[Cursor],
        dedupe: bool,
        quarantine: Sequence[Quarantined],
    ) -> AppendResult:
        try:
            result = await self.inner.append(
                ev.records, [*cursors, *ev.cursors], dedupe=dedupe, quarantine=quarantine
            )
        except asyncio.CancelledError:
            raise  # the commit may still land (the outbox shields it); state stays
        except Exception:
            self.engine.undo(ev)  # not committed: the redelivered input raises again
            raise
        self.engine.committed(ev)
        return result

    async def tick(self, now: float | None = None) -> int:
        """Run the timer once; returns how many rule records it committed."""
        ev = self.engine.tick(self.clock() if now is None else now)
        if not ev.changed:
            return 0
        async with self.lock:
            await self._commit(ev, [], False, ())
        return ev.emitted

    async def run_timer(self) -> None:
        """Tick until cancelled; a failed commit is logged and retried next tick."""
        interval = tick_interval(list(self.engine.rules.values()))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.tick()
            except Exception as exc:
                log.error("rules_tick_failed", source=self.engine.source, error=repr(exc))

    async def cursor(self, source: str, key: str) -> Any | None:
        """The last committed cursor value."""
        return await self.inner.cursor(source, key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def load_engine(source: Source, rules: list[RuleConfig], out: Output) -> RuleEngine:
    """A rules engine for ``source`` with its durable state read back from the outbox."""
    engine = RuleEngine(source.name, rules, source.ref)
    # Output's contract has one-key reads; the outbox (and SlotOutput) list all of them.
    cursors = getattr(out, "cursors", None)
    saved: dict[str, Any] = await cursors(source.name) if callable(cursors) else {}
    engine.restore(saved, time.time())
    raised = sum(s.raised for states in engine.states.values() for s in states.values())
    log.info("rules_loaded", source=source.name, rules=len(rules), raised=raised)
    return engine


async def run_source(source: Source, out: Output, *, rules: bool) -> None:
    """Run ``source`` (what the supervisor awaits), with its rules if its plugin runs
    rules (``rules``) and its config has any."""
    configured = list(source.config.rules) if rules else []
    if not configured:
        await source.run(out)
        return
    wrapped = RuleOutput(out, await load_engine(source, configured, out))
    source.rules = wrapped.engine  # status shows the rule counters
    timer = asyncio.create_task(wrapped.run_timer(), name=f"rules:{source.name}")
    try:
        await source.run(wrapped)
    finally:
        timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await timer
