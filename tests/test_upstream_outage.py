"""A WAN outage: the receiver is down while 100k records are appended, then comes back.

The receiver runs as its own process (``python -m agent receiver``) and is killed
(SIGKILL) for the outage. Every record arrives (by id), none is stored twice, per-entity
order holds. The catch-up rate against the ingest rate is printed, never asserted
(benchmarks/drain.py measures throughput).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from upstream_support import (  # fixtures are used by name
    TOKEN,
    make_records,
    make_settings,
    outbox_fixture,  # noqa: F401
)

from agent.forwarder import RETRYING, Forwarder
from agent.outbox import Outbox
from agent.receiver import Store
from tests.helpers.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
TOTAL = 100_000
CHUNK = 500
INGEST_PER_SECOND = 1_250  # paced like a busy site; the catch-up must be much faster


class ReceiverProcess:
    """``edge-agent receiver`` in a subprocess, on a fixed port, killable."""

    def __init__(self, db: Path) -> None:
        self.db = db
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "receiver", "--listen", f"127.0.0.1:{self.port}",
             "--db", str(self.db), "--token", TOKEN],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        async with httpx.AsyncClient() as client:

            async def up() -> bool:
                try:
                    return (await client.get(self.url + "/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(up, 30, "receiver process up")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def receiver_process(tmp_path: Path) -> Iterator[ReceiverProcess]:
    rx = ReceiverProcess(tmp_path / "receiver.db")
    yield rx
    rx.kill()


@pytest.mark.slow
async def test_outage_then_catch_up(
    tmp_path: Path, outbox: Outbox, receiver_process: ReceiverProcess
) -> None:
    rx = receiver_process
    await rx.start()
    store = Store(rx.db)  # read-only use beside the receiver process (WAL)
    settings = make_settings(tmp_path, rx.url, backoff_initial=0.05, backoff_cap=0.5)
    forwarder = Forwarder(outbox, settings.upstream, "agent-test")
    await forwarder.start()
    try:
        rx.kill()  # the WAN goes down
        records = make_records(TOTAL, entities=5_000)
        ids: list[str | None] = []
        began = time.monotonic()
        for n, start in enumerate(range(0, TOTAL, CHUNK)):
            ids += (await outbox.append(records[start : start + CHUNK])).ids
            ahead = began + (n + 1) * CHUNK / INGEST_PER_SECOND - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)  # pacing the producer, not waiting for a condition
        ingest_rate = TOTAL / (time.monotonic() - began)
        assert forwarder.state == RETRYING
        assert forwarder.status()["requests"].get("connect_error", 0) >= 1
        assert store.count() == 0

        await rx.start()  # the WAN is back
        back = time.monotonic()
        await wait_for(forwarder_drained(outbox), 300, "outbox drained")
        drain_rate = TOTAL / (time.monotonic() - back)
    finally:
        await forwarder.stop()
    assert store.ids() == set(ids)
    assert store.count() == TOTAL  # ids are unique there: nothing stored twice
    assert store.order_violations() == []
    duplicates = store.stats()["duplicates"]
    store.close()
    print(
        f"\noutage: ingest {ingest_rate:,.0f} rec/s, catch-up {drain_rate:,.0f} rec/s, "
        f"ratio {drain_rate / ingest_rate:.1f}x, re-sent duplicates {duplicates}"
    )


def forwarder_drained(outbox: Outbox):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return sum((await outbox.stats()).rows.values()) == 0

    return check
