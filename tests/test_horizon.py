"""The buffer horizon (agent.horizon): rates of the last hour per retention class, what
happens per class when the budget runs out, "measuring" after a start; in the outbox,
/v1/status, /readyz, /metrics and `edge-agent status`."""

from __future__ import annotations

from pathlib import Path

import httpx

from agent import ctl
from agent.health import Component, Health, Kind, State, readiness
from agent.horizon import WINDOW, Flow, describe, horizon
from agent.outbox import Outbox
from tests.agent_harness import running_agent, settings_for
from tests.outbox_helpers import reading, work_order

MiB = 1 << 20


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def flow_with(clock: Clock, business: int, readings: int, seconds: float) -> Flow:
    """A flow that took in ``business``/``readings`` bytes per second for ``seconds``."""
    flow = Flow(clock)
    for _ in range(int(seconds // 60)):
        clock.t += 60
        flow.ingested({"business": (1, business * 60), "reading": (10, readings * 60)})
    return flow


def test_block_both_classes_fill_the_budget_together() -> None:
    clock = Clock()
    flow = flow_with(clock, business=100, readings=900, seconds=3600)
    h = horizon(
        flow,
        max_bytes=100 * MiB,
        used={"business": 10 * MiB, "reading": 30 * MiB},
        when_full="block",
        readings_max_age=None,
        oldest_reading_age=None,
        min_sample=600,
    )
    assert not h.measuring
    free = 60 * MiB
    assert h.seconds is not None
    assert abs(h.seconds - free / 1000) < 1e-6
    assert h.then == "block"
    assert h.classes["business"].seconds == h.classes["reading"].seconds == h.seconds
    assert describe(h).startswith("about 17 hours at the current rate, then sources are paused")


def test_drop_oldest_readings_drop_first_business_blocks_later() -> None:
    clock = Clock()
    flow = flow_with(clock, business=100, readings=900, seconds=3600)
    h = horizon(
        flow,
        max_bytes=100 * MiB,
        used={"business": 10 * MiB, "reading": 30 * MiB},
        when_full="drop_oldest",
        readings_max_age=None,
        oldest_reading_age=None,
        min_sample=600,
    )
    assert h.classes["reading"].then == "drop"
    assert h.classes["reading"].seconds is not None
    assert abs(h.classes["reading"].seconds - 60 * MiB / 1000) < 1e-6
    # Business records may use the whole budget once every reading is dropped.
    assert h.classes["business"].then == "block"
    assert h.classes["business"].seconds is not None
    assert abs(h.classes["business"].seconds - 90 * MiB / 100) < 1e-6
    assert (h.seconds, h.then) == (h.classes["reading"].seconds, "drop")
    assert "readings are dropped" in describe(h)


def test_readings_max_age_bounds_the_readings_horizon() -> None:
    clock = Clock()
    flow = flow_with(clock, business=0, readings=10, seconds=3600)
    h = horizon(
        flow,
        max_bytes=1 << 30,
        used={"business": 0, "reading": 0},
        when_full="block",
        readings_max_age=7200.0,
        oldest_reading_age=1800.0,
        min_sample=600,
    )
    assert (h.seconds, h.then) == (5400.0, "drop")
    assert h.classes["business"].seconds is None  # nothing comes in: no limit


def test_measuring_after_a_start_and_nothing_coming_in() -> None:
    clock = Clock()
    flow = Flow(clock)
    clock.t += 120
    flow.ingested({"business": (5, 5000)})
    args = {
        "max_bytes": MiB,
        "used": {"business": 5000, "reading": 0},
        "when_full": "block",
        "readings_max_age": None,
        "oldest_reading_age": None,
    }
    early = horizon(flow, min_sample=600, **args)  # type: ignore[arg-type]
    assert early.measuring
    assert describe(early) == "measuring (2 minutes of data so far)"
    assert early.as_dict()["state"] == "measuring"
    idle = Flow(clock)
    clock.t += 3 * WINDOW
    quiet = horizon(idle, min_sample=600, **args)  # type: ignore[arg-type]
    assert not quiet.measuring
    assert quiet.seconds is None
    assert describe(quiet).startswith("no limit")


def test_the_flow_is_bounded_and_forgets_what_is_older_than_an_hour() -> None:
    clock = Clock()
    flow = Flow(clock)
    for _ in range(5 * 60):  # five hours, one bucket a minute
        clock.t += 60
        flow.ingested({"business": (1, 60), "reading": (2, 120)})
        flow.delivered(3)
    assert all(len(s.buckets) <= 61 for s in flow._in.values())
    assert len(flow._out.buckets) <= 61
    rows, size = flow.rates()["reading"]
    assert abs(size - 2.0) < 0.05  # 120 bytes a minute, not five hours' worth
    assert abs(rows - 2 / 60) < 0.001
    lines = flow.sparklines()
    assert len(lines["ingest"]) == len(lines["delivered"]) == 61
    assert lines["ingest"][-1] == 3
    assert lines["delivered"][-1] == 3


def test_readiness_warns_below_the_threshold_and_stays_ready() -> None:
    ok = [Component(Kind.OUTBOX, "", Health(State.OK))]
    low = readiness(ok, horizon=3600.0, horizon_warn=86400.0, horizon_text="about 60 minutes")
    assert low.ready
    assert low.warnings == ["buffer horizon is about 60 minutes (warn below 86400s)"]
    assert readiness(ok, horizon=2 * 86400.0, horizon_warn=86400.0).warnings == []
    assert readiness(ok, horizon=None, horizon_warn=86400.0).warnings == []


async def test_the_outbox_counts_what_it_commits_and_delivers(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", disk_reserve=0)
    await box.open()
    try:
        clock = Clock()
        box.flow = Flow(clock)
        clock.t += WINDOW
        await box.append([work_order(f"WO{i}") for i in range(3)])
        await box.append([reading("p", i) for i in range(5)])
        await box.append([work_order("WO0")])  # unchanged: not stored, not counted
        stats = await box.stats()
        rates = box.flow.rates()
        assert rates["business"][0] * WINDOW == 3
        assert rates["business"][1] * WINDOW == stats.bytes["business"]
        assert rates["reading"][1] * WINDOW == stats.bytes["reading"]
        assert stats.oldest_reading_age_seconds is not None
        leased = await box.lease(100, 1 << 20)
        await box.ack([r.seq for r in leased])
        assert box.flow.sparklines()["delivered"][-1] == 8
        assert box.flow.sparklines()["ingest"][-1] == 8
    finally:
        await box.close()


async def test_status_readyz_metrics_and_the_cli_show_the_horizon(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, outbox={"max_bytes": "1MiB"}, api={"horizon_warn": "30d"})
    async with running_agent(settings) as agent:
        base = f"http://{settings.api.listen}"
        async with httpx.AsyncClient(base_url=base) as http:
            early = (await http.get("/v1/status")).json()["outbox"]["horizon"]
            assert early["state"] == "measuring"
            assert "\nedge_agent_buffer_horizon_seconds " not in (await http.get("/metrics")).text
            agent.outbox.flow.started_at -= 3600  # as if it had run for an hour
            await agent.outbox.append([work_order(f"WO{i}", pad=2000) for i in range(10)])
            status = (await http.get("/v1/status")).json()
            ahead = status["outbox"]["horizon"]
            used = status["outbox"]["total_bytes"]
            assert ahead["state"] == "known"
            assert ahead["then"] == "block"
            expected = (MiB - used) / (used / 3600)
            assert abs(ahead["seconds"] - expected) / expected < 0.01
            ready = (await http.get("/readyz")).json()
            assert any(w.startswith("buffer horizon is about ") for w in ready["warnings"])
            metrics = (await http.get("/metrics")).text
            assert "\nedge_agent_buffer_horizon_seconds " in metrics
            assert 'edge_agent_buffer_horizon_class_seconds{class="reading",then="block"} +Inf' in (
                metrics
            )
            text = ctl.render_status(status)
            assert f"buffer horizon {ahead['text']}" in text
            assert "business " in text.split("buffer horizon", 1)[1]
