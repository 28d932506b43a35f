"""Disk full: the outbox lives on a small tmpfs that a filler file fills up.

The agent must stop taking the disk's last bytes: below ``outbox.disk_reserve`` appends
wait (the MQTT source stops acknowledging, messages wait at the broker), so deletes and
checkpoints keep their room. It must say so (status ``outbox.disk``, the reason in
``/readyz``, ``edge_agent_outbox_disk_low``), keep running (``/healthz`` answers), lose
nothing it acknowledged, and resume by itself once space returns (the filler is
deleted): no restart. (Before the reserve, the backlog that rushed in when space
returned filled the disk with WAL that could no longer be copied into the full
database file: no commit succeeded any more, under load the test hung.)

Needs root to mount; skipped with the reason when mounting is impossible.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.mosquitto import Mosquitto
from tests.helpers.tmpfs import fill, small_tmpfs
from tests.reliability.support import (
    T0,
    Agent,
    PublisherThread,
    ReceiverProc,
    agent_config,
    message,
    mqtt_source,
    reading_id,
    report,
    wait_until,
)

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

DISK = "4m"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for this test (unmounted afterwards)."""
    with small_tmpfs(tmp_path / "disk", DISK) as mnt:
        yield mnt


def test_disk_full_reported_nothing_lost_resumes(
    tmp_path: Path, small_disk: Path, mosquitto: Mosquitto
) -> None:
    rx = ReceiverProc(tmp_path)  # down during the fill, so the outbox only grows
    config = agent_config(
        tmp_path, rx.url, sources={"plant": mqtt_source(mosquitto.port, "rel-disk")}
    )
    config["agent"]["state_dir"] = str(small_disk / "state")  # default disk_reserve "auto"
    agent = Agent(tmp_path, config).start()
    try:
        agent.wait_ready_sync()
        wait_until(lambda: agent.events("mqtt_subscribed"), "MQTT subscribed")
        reserve = agent.status_sync()["outbox"]["disk"]["reserve_bytes"]
        assert reserve == 1 << 20  # "auto" on 4 MiB: a quarter of the disk
        filler = fill(small_disk, leave=64 * 1024)
        with PublisherThread(mosquitto.port, rate=400) as pub:
            # Appends wait (the source stops reading) instead of taking the last bytes.
            disk = wait_until(lambda: waiting_for_disk(agent), "appends waiting for disk",
                              detail=lambda: agent.status_sync()["outbox"])  # fmt: skip
            assert disk["low"]
            assert disk["free_bytes"] < reserve
            ready = wait_until(lambda: agent.get_sync("/readyz"), "readyz answers")
            assert ready.status_code == 503
            reasons = ready.json()["reasons"]
            assert any(
                r.startswith("outbox: disk free ") and "below reserve 1.0 MiB" in r for r in reasons
            ), reasons
            agent.check_alive()
            health = agent.get_sync("/healthz")
            assert health is not None
            assert health.status_code == 200
            metrics = agent.get_sync("/metrics")
            assert metrics is not None
            assert "edge_agent_outbox_disk_low 1.0" in metrics.text
            assert agent.events("outbox_disk_low_backpressure")
            # The publisher goes on while the disk stays full: the messages wait at the
            # broker (not acknowledged), the agent keeps running.
            published = len(pub.sent)
            wait_until(lambda: len(pub.sent) > published + 100, "publishing goes on")
            agent.check_alive()
            sent_during_full = len(pub.sent)
            filler.unlink()  # space returns
            rx.start()  # and the upstream, so the outbox drains
            wait_until(lambda: ready_ok(agent), "ready again without a restart",
                       detail=lambda: agent.get_sync("/readyz").json())  # fmt: skip
            assert agent.events("outbox_disk_ok")
            sent = pub.stop()
        expected = {reading_id(message(s)[0], T0 + s) for s in sent}
        wait_until(lambda: expected <= rx.ids(), "every published message at the receiver",
                   detail=lambda: f"{len(expected - rx.ids())} missing")  # fmt: skip
        status = agent.status_sync()
        assert status["outbox"]["recovered_from"] is None
        assert status["outbox"]["disk"]["low"] is False
        assert agent.stop() == 0
        assert rx.order_violations() == []
        report(
            "disk_full",
            filesystem=f"tmpfs {DISK}",
            disk_reserve=reserve,
            write_errors=status["outbox"]["write_errors"],
            last_write_error=status["outbox"]["last_write_error"],
            messages=len(sent),
            published_while_full=sent_during_full,
            lost=0,
            restarts=0,
            duplicates_dropped_by_receiver=rx.stats()["duplicates"],
        )
    finally:
        agent.kill()
        rx.kill()


def waiting_for_disk(agent: Agent) -> dict[str, object] | None:
    disk: dict[str, object] = agent.status_sync()["outbox"]["disk"]
    blocked = disk["blocked_appends"]
    return disk if isinstance(blocked, int) and blocked > 0 else None


def ready_ok(agent: Agent) -> bool:
    answer = agent.get_sync("/readyz")
    return answer is not None and answer.status_code == 200
