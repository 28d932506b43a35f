"""SIGKILL the appending process at random moments; every append that returned survives.

Nothing half-written may appear either: a batch is present with all its records or not at
all, and a producer's cursor never points past what is stored.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from agent.outbox import Outbox
from tests.crash_child import PER_BATCH

ROOT = Path(__file__).resolve().parents[1]
PRODUCERS = 4
KILLS = 12


def run_child_and_kill(db: Path, start: int, rng: random.Random) -> set[tuple[int, int]]:
    """Start the child, kill -9 it after a random delay; return the (producer, batch) acked."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.crash_child", str(db), str(start), str(PRODUCERS)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # wait until it really appends
    assert first.startswith("ok"), proc.stderr.read() if proc.stderr else ""
    time.sleep(rng.uniform(0.0, 0.4))
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    acked: set[tuple[int, int]] = set()
    for line in [first, *out.splitlines()]:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "ok":
            acked.add((int(parts[1]), int(parts[2])))
    return acked


def stored_batches(db: Path) -> tuple[dict[tuple[int, int], int], dict[str, int]]:
    con = sqlite3.connect(db)
    try:
        counts: dict[tuple[int, int], int] = {}
        for (body,) in con.execute("SELECT body FROM records"):
            data = orjson.loads(body)["data"]
            key = (data["producer"], data["batch"])
            counts[key] = counts.get(key, 0) + 1
        cursors = {k: orjson.loads(v) for k, v in con.execute("SELECT key, value FROM cursors")}
        return counts, cursors
    finally:
        con.close()


@pytest.mark.slow
async def test_kill_minus_nine_never_loses_a_returned_append(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    rng = random.Random(20261122)
    acked: set[tuple[int, int]] = set()
    start = 0
    for _ in range(KILLS):
        acked |= run_child_and_kill(db, start, rng)
        # the integrity check runs at open and must pass after every crash
        async with Outbox(db) as box:
            assert box.recovered_from is None
        counts, cursors = stored_batches(db)
        for (p, b), n in counts.items():
            assert n == PER_BATCH, f"batch {p}/{b} is half-written: {n} records"
        lost = sorted(acked - set(counts))
        assert not lost, f"returned appends lost: {lost[:10]}"
        for p in range(PRODUCERS):
            last = max((b for q, b in acked if q == p), default=None)
            if last is not None:
                assert cursors[f"p{p}"] >= last
                assert (p, cursors[f"p{p}"]) in counts  # the cursor never runs ahead
        start = max(b for _, b in counts) + 1
    assert len(acked) > KILLS * PRODUCERS  # the test really appended under fire
