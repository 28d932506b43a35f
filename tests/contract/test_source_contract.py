"""The source contract, run against EVERY registered source type (agent/sources REGISTRY).

Each type is driven by its harness (tests/contract/harness.py): a real peer, good and bad
input, a way to break the peer. What every source must do (agent/sources/base.py):

* ``run(out)`` runs until cancelled and then raises ``CancelledError`` promptly, even
  under load and even while an append is pending, or when a library swallowed the cancel
  (Python 3.11's ``asyncio.wait_for``);
* it acknowledges input (MQTT PUBACK, SQL watermark) only after its append committed: an
  append that fails or never returns leaves the input to be read again;
* the awaited append is the backpressure: while it waits, the source does not pile up
  appends nor unbounded memory, and loses nothing;
* a new instance after a crash resumes from what was committed, losing nothing;
* bad input is quarantined beside good input, which still arrives;
* its health goes ``starting`` -> ``ok`` -> ``retrying`` -> ``ok`` as its peer goes and
  comes back;
* a reload that changes its table restarts only it.

"Lost nothing" is checked the same way everywhere: a fresh instance (or the same one)
runs until every input the harness fed is in the outbox file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent import config as cfg
from agent.health import State
from agent.outbox import Outbox
from agent.sources.base import Source
from tests.agent_harness import running_agent
from tests.agent_process import toml_dumps
from tests.contract.harness import HARNESSES, Envelope, SourceHarness, Unavailable, parse
from tests.contract.registry import build_source, source_types
from tests.helpers.agentproc import outbox_rows
from tests.helpers.cancel import assert_stops_after_swallowed_cancel
from tests.helpers.outputs import PowerCut, TestOutput
from tests.helpers.waiting import wait_for

STOP_DEADLINE = 10.0
"""How long a cancelled run() may take to end before the case fails (generous: the
machine is loaded; a source that does stop does so in milliseconds)."""

PARAMS = [
    pytest.param(cls, id=cls.type if len(HARNESSES[kind]) == 1 else f"{kind}-{cls.__name__}")
    for kind in source_types()
    for cls in HARNESSES.get(kind, [])
]


@pytest.fixture(params=PARAMS)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SourceHarness]:
    """A started peer of one registered source type."""
    try:
        h: SourceHarness = request.param(tmp_path)
        await h.start()
    except Unavailable as exc:
        pytest.skip(str(exc))
    try:
        yield h
    finally:
        await h.stop()


@dataclass
class Running:
    """One source instance in its task."""

    source: Source
    task: asyncio.Task[None]


@dataclass
class Rig:
    """A harness, one outbox file, and the source instances run on it."""

    h: SourceHarness
    path: Path
    name: str = "src"
    box: Outbox | None = None
    runs: list[Running] = field(default_factory=list)

    async def open(self) -> Outbox:
        self.box = Outbox(self.path)
        await self.box.open()
        return self.box

    async def close(self) -> None:
        """Close the outbox as a dying process leaves it (nothing more is committed)."""
        if self.box is not None:
            await self.box.close()
            self.box = None

    def stored(self) -> list[Envelope]:
        return [json.loads(body) for _, body in outbox_rows(self.path)]

    def stored_keys(self) -> Counter[str]:
        return Counter(k for r in self.stored() if (k := self.h.key(r)) is not None)

    def missing(self) -> set[str]:
        return self.h.expected() - set(self.stored_keys())

    def quarantine_reasons(self) -> list[str]:
        return [r for (r,) in outbox_rows(self.path, "SELECT reason FROM quarantine")]

    def start(self, out: TestOutput, table: dict[str, Any] | None = None) -> Running:
        config = parse(self.h, table or self.h.table(self.name))
        source = build_source(self.h.type, self.name, config)
        run = Running(source, asyncio.create_task(source.run(out), name=f"contract:{self.name}"))
        self.runs.append(run)
        return run

    def supervise(self, out: TestOutput) -> Running:
        """Run instances one after the other as the supervisor does: a run() that ends by
        an exception is followed by a new instance (``run.source`` is the current one)."""
        first = self.start(out)
        self.runs.remove(first)
        run = Running(first.source, first.task)

        async def loop() -> None:
            task = first.task
            while True:
                try:
                    await task
                except asyncio.CancelledError:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    raise
                except Exception:  # the supervisor logs, counts and restarts it
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("run() returned without being cancelled")
                nxt = self.start(out)
                self.runs.remove(nxt)
                run.source, task = nxt.source, nxt.task

        run.task = asyncio.create_task(loop(), name=f"contract:supervise:{self.name}")
        self.runs.append(run)
        return run

    async def ready(self, run: Running) -> None:
        task = asyncio.ensure_future(self.h.ready(run.source, self.stored))
        await asyncio.wait({task, run.task}, return_when=asyncio.FIRST_COMPLETED)
        if run.task.done():
            task.cancel()
            run.task.result()
            raise AssertionError("run() returned")
        task.result()

    async def until_delivered(self, what: str, timeout: float = 60.0) -> None:
        await wait_for(lambda: not self.missing(), timeout, what,
                       detail=lambda: f"missing: {sorted(self.missing())[:10]}")  # fmt: skip

    async def settle(self) -> None:
        """A fresh instance on the outbox runs until every fed input is stored."""
        if self.box is None:
            await self.open()
        assert self.box is not None
        run = self.start(TestOutput(self.box))
        await self.until_delivered("every fed input stored after a restart")
        await stop(run, "the settling instance")

    async def cleanup(self) -> None:
        for run in self.runs:
            run.task.cancel()
        await asyncio.gather(*(r.task for r in self.runs), return_exceptions=True)
        await self.close()


@pytest.fixture
async def rig(harness: SourceHarness, tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(harness, tmp_path / "outbox.db")
    try:
        yield r
    finally:
        await r.cleanup()


async def stop(run: Running, what: str) -> None:
    """Cancel ``run``; it must end with CancelledError within the deadline."""
    run.task.cancel()
    done, _ = await asyncio.wait({run.task}, timeout=STOP_DEADLINE)
    assert done, f"{what}: run() still going {STOP_DEADLINE:g}s after its cancel"
    assert run.task.cancelled(), f"{what}: ended with {run.task.exception()!r}, not cancelled"


@contextlib.asynccontextmanager
async def feeding(h: SourceHarness, batch: int = 5) -> AsyncIterator[None]:
    """Feed input continuously (a source under load) for the block."""
    done = asyncio.Event()

    async def loop() -> None:
        while not done.is_set():
            await h.feed(batch)
            await asyncio.sleep(0.01)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        done.set()
        await task


async def crashed(run: Running) -> BaseException:
    """Wait until ``run`` ended by an exception (a simulated crash), and return it."""
    done, _ = await asyncio.wait({run.task}, timeout=60)
    assert done, "the source went on after its append failed (a crash was expected)"
    assert not run.task.cancelled()
    exc = run.task.exception()
    assert exc is not None, "run() returned"
    return exc


def has_records(records: Any) -> bool:
    return len(records) > 0


# ---------------------------------------------------------------------- cases


async def test_start_and_stop_under_load(rig: Rig) -> None:
    """Stopped while input streams in, run() ends promptly with CancelledError, and
    nothing it read and did not commit is lost (a new instance gets it again)."""
    out = TestOutput(await rig.open())
    run = rig.start(out)
    await rig.ready(run)
    async with feeding(rig.h):
        await wait_for(lambda: out.committed >= 5, 30, "appends under load")
        await stop(run, "a source under load")
    await rig.settle()


async def test_cancel_while_append_is_pending(rig: Rig) -> None:
    """Cancelled while its append waits (a full outbox), run() ends promptly; the input
    of that append was not acknowledged: a new instance stores it."""
    out = TestOutput(await rig.open())
    run = rig.start(out)
    await rig.ready(run)
    out.block()
    await rig.h.feed(3)
    await wait_for(out.waiting.is_set, 30, "an append waiting at the full outbox")
    committed = out.committed
    await stop(run, "a source with a pending append")
    assert out.committed == committed, "the pending append committed after all"
    await rig.settle()


async def test_cancel_swallowed_inside_append_still_stops(rig: Rig) -> None:
    """The ``wait_for`` lost cancellation: the append commits and returns although the
    task was cancelled meanwhile (Python 3.11 drops the cancel then). run() must still
    end with CancelledError, and lose nothing."""
    out = TestOutput(await rig.open())
    run = rig.start(out)
    await rig.ready(run)
    out.swallow_cancel = True
    await rig.h.feed(3)
    await assert_stops_after_swallowed_cancel(run.task, out.started, f"the {rig.h.type} source")
    await rig.settle()


async def test_input_is_acknowledged_only_after_commit(rig: Rig) -> None:
    """An append that fails (a full disk) stores nothing and acknowledges nothing: the
    source (restarted by the supervisor if it gave up) reads that input again."""
    box = await rig.open()
    out = TestOutput(box)
    run = rig.supervise(out)  # a source may give up on the error: then a new instance
    await rig.ready(run)
    out.fail(when=has_records)
    await rig.h.feed(3)
    await wait_for(out.fault_spent, 30, "the failing append")
    await rig.until_delivered("the failed append's input read again")
    await stop(run, "the source after a failed append")


async def test_backpressure_while_the_outbox_is_full(rig: Rig) -> None:
    """While appends wait, the source starts no further ones, holds bounded memory, and
    once the outbox takes records again everything fed meanwhile arrives."""
    out = TestOutput(await rig.open())
    run = rig.start(out)
    await rig.ready(run)
    out.block()
    await rig.h.feed(5)
    await wait_for(out.waiting.is_set, 30, "an append waiting at the full outbox")
    waiting_calls = out.calls
    await rig.h.feed(rig.h.flood)  # more than the source may hold
    bound = rig.h.held(run.source)
    if bound is not None:
        await wait_for(lambda: run.source.status().get("reading_paused"), 30, "reading paused")
        held, limit = rig.h.held(run.source) or bound
        assert held <= limit + 8192, f"holds {held} bytes waiting for a commit (limit {limit})"
    else:
        # No figure to wait for: give it a moment to misbehave (a negative check; it
        # cannot fail a correct source, however slow the machine is).
        await asyncio.sleep(0.5)
    assert out.calls == waiting_calls, "appends started while the previous one waited"
    assert out.max_in_flight <= max(1, waiting_calls - out.committed)
    out.unblock()
    await rig.until_delivered("everything fed while blocked")
    await stop(run, "the source after backpressure")


@pytest.mark.parametrize("after_commit", [False, True], ids=["before-commit", "after-commit"])
async def test_restart_after_a_crash_resumes_from_the_committed_position(
    rig: Rig, after_commit: bool
) -> None:
    """The process dies at an append (before its commit, or after it and before the
    acknowledgement); a new instance on the reopened outbox loses nothing, and where a
    committed cursor says what was read, reads nothing twice."""
    out = TestOutput(await rig.open())
    run = rig.start(out)
    await rig.ready(run)
    await rig.h.feed(3)
    await rig.until_delivered("first inputs stored")
    out.fail(PowerCut(), when=has_records, after_commit=after_commit)
    await rig.h.feed(3)
    exc = await crashed(run)
    assert "PowerCut" in repr(exc)
    await rig.close()  # the process is gone; its outbox file stays
    await rig.h.feed(3)
    await rig.settle()
    if not rig.h.duplicates_possible:
        twice = [k for k, n in rig.stored_keys().items() if n > 1]
        shown = [r for r in rig.stored() if rig.h.key(r) in twice]
        assert twice == [], f"read again although its cursor was committed: {shown}"


async def test_bad_input_is_quarantined_beside_good_input(rig: Rig) -> None:
    """A bad input is quarantined with a reason; the good inputs around it are stored."""
    out = TestOutput(await rig.open())
    run = rig.start(out)
    await rig.ready(run)
    await rig.h.feed(2)
    await rig.h.feed_bad()
    await wait_for(
        lambda: any(rig.h.bad_reason in r for r in rig.quarantine_reasons()), 30,
        "bad input quarantined", detail=rig.quarantine_reasons,
    )  # fmt: skip
    await rig.h.feed(2)
    await rig.until_delivered("good input around the bad one stored")
    await stop(run, "the source after bad input")


async def test_health_goes_starting_ok_retrying_ok(rig: Rig) -> None:
    """The source's typed health follows its peer: starting until proven, ok, retrying
    while the peer is away, ok again once it is back."""

    def state() -> State:
        return run.source.health().health.state

    out = TestOutput(await rig.open())
    config = parse(rig.h, rig.h.table(rig.name))
    source = build_source(rig.h.type, rig.name, config)
    assert source.health().health.state is State.STARTING
    run = Running(source, asyncio.create_task(source.run(out)))
    rig.runs.append(run)
    await wait_for(lambda: state() is State.OK, 30, "ok", detail=state)
    await rig.h.break_peer()
    await wait_for(lambda: state() is State.RETRYING, 30, "retrying", detail=state)
    await rig.h.restore_peer()
    await wait_for(lambda: state() is State.OK, 30, "ok again", detail=state)
    await stop(run, "the source after its peer came back")


async def test_reload_restarts_only_the_changed_source(rig: Rig, tmp_path: Path) -> None:
    """In the real agent, a reload that changes one source's table restarts that source
    (a new instance on the new config) and leaves its sibling of the same type running."""
    h = rig.h
    data: dict[str, Any] = {
        "agent": {"id": "contract-agent", "site": "s1", "state_dir": str(tmp_path / "state")},
        "upstream": {"url": "http://127.0.0.1:9", "token": "t", "drain_timeout": "1s"},
        "api": {"enabled": False},
        "sources": {"a": h.table("a"), "b": h.table("b")},
    }
    path = tmp_path / "config.toml"
    path.write_text(toml_dumps(data) + "\n")
    settings, _ = cfg.load(path)
    async with running_agent(settings, path) as agent:
        slots = agent.slots

        def started(name: str) -> Callable[[], bool]:
            return lambda: slots.get(name) is not None and slots[name].source is not None

        await wait_for(lambda: started("a")() and started("b")(), 30, "both sources running")
        a, b = slots["a"], slots["b"]
        data["sources"]["a"] = h.changed(data["sources"]["a"])
        path.write_text(toml_dumps(data) + "\n")
        assert await agent.reload()
        await wait_for(lambda: slots.get("a") is not a and started("a")(), 30, "a restarted")
        assert a.task is not None
        assert a.task.done(), "the old instance of a still runs"
        assert slots["a"].config == parse(h, data["sources"]["a"])
        assert slots["b"] is b, "b was restarted"
        assert b.task is not None
        assert not b.task.done()
        assert b.restarts == 0
