"""Disk full: the outbox lives on a small tmpfs that a filler file fills up.

The agent must say so (status ``outbox.write_errors`` / ``last_write_error``, a reason in
``/readyz``), keep running (``/healthz`` answers), lose nothing it acknowledged (an MQTT
message is acknowledged only after its commit, so what failed to commit stays with the
broker), and resume by itself once space returns (the filler is deleted): no restart.

Needs root to mount; skipped with the reason when mounting is impossible.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.mosquitto import Mosquitto
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
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill the filesystem but ``leave`` bytes; returns the filler file."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with filler.open("wb") as fh, contextlib.suppress(OSError):
        fh.write(b"\0" * max(0, free - leave))
    return filler


def test_disk_full_reported_nothing_lost_resumes(
    tmp_path: Path, small_disk: Path, mosquitto: Mosquitto
) -> None:
    rx = ReceiverProc(tmp_path)  # down during the fill, so the outbox only grows
    config = agent_config(
        tmp_path, rx.url, sources={"plant": mqtt_source(mosquitto.port, "rel-disk")}
    )
    config["agent"]["state_dir"] = str(small_disk / "state")
    agent = Agent(tmp_path, config).start()
    try:
        agent.wait_ready()
        wait_until(lambda: agent.events("mqtt_subscribed"), "MQTT subscribed")
        filler = fill(small_disk, leave=64 * 1024)
        with PublisherThread(mosquitto.port, rate=400) as pub:
            outbox = wait_until(lambda: failing(agent), "a write error reported in status")
            ready = wait_until(lambda: agent.get("/readyz"), "readyz answers")
            assert ready.status_code == 503
            assert any("outbox write failed" in r for r in ready.json()["reasons"])
            assert "full" in outbox["last_write_error"]
            agent.check_alive()
            health = agent.get("/healthz")
            assert health is not None
            assert health.status_code == 200
            # Keep publishing while the disk stays full: the agent keeps running.
            errors = outbox["write_errors"]
            wait_until(lambda: failing(agent)["write_errors"] > errors, "further write errors")
            sent_during_full = len(pub.sent)
            filler.unlink()  # space returns
            rx.start()  # and the upstream, so the outbox drains
            wait_until(lambda: ready_ok(agent), "ready again without a restart",
                       detail=lambda: agent.get("/readyz").json())  # fmt: skip
            sent = pub.stop()
        expected = {reading_id(message(s)[0], T0 + s) for s in sent}
        wait_until(lambda: expected <= rx.ids(), "every published message at the receiver",
                   detail=lambda: f"{len(expected - rx.ids())} missing")  # fmt: skip
        status = agent.status()
        assert status["outbox"]["recovered_from"] is None
        assert agent.stop() == 0
        assert rx.order_violations() == []
        report(
            "disk_full",
            filesystem=f"tmpfs {DISK}",
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


def failing(agent: Agent) -> dict[str, object] | None:
    outbox: dict[str, object] = agent.status()["outbox"]
    return outbox if outbox["write_errors"] else None


def ready_ok(agent: Agent) -> bool:
    answer = agent.get("/readyz")
    return answer is not None and answer.status_code == 200
