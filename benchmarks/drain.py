"""Drain benchmark: outbox → forwarder → reference receiver on 127.0.0.1.

1M records (100k with --quick) are put in an outbox; a subprocess runs the real forwarder
until the outbox is empty (its own peak RSS is read from /proc/self/status VmHWM). The
ceiling, measured in the same run, is a bare httpx loop posting the same batches (same
bodies, same gzip rule, no outbox) to a fresh receiver. Both receivers are separate
processes (``python -m agent receiver``), so they do not share the agent's CPU time.

    python benchmarks/drain.py [--quick] [--concurrency N]

Last line: JSON with benchmark, value (records/s), unit, ceiling, ratio, peak_rss_mb.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.outbox import Outbox
from agent.records import EntityType, Record, SourceRef
from agent.sinks.http import GZIP_LEVEL, encode_batch
from tests.helpers.waiting import free_port

TOKEN = "bench-token"
BATCH = 1000
MAX_BYTES = 4 << 20
GZIP_MIN = 8 << 10
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def start_receiver(db: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "receiver", "--listen", f"127.0.0.1:{port}",
         "--db", str(db), "--token", TOKEN],
        cwd=ROOT, env=ENV, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("receiver did not start")


def records(n: int) -> list[Record]:
    src = SourceRef("bench", "sap_ecc", "plant-1")
    return [
        Record.entity(
            src,
            EntityType.WORK_ORDER,
            f"{i % 50_000:012d}",
            {"title": f"Replace door motor {i}", "status": "released", "priority": i % 4},
            source_modified_at="2026-11-21T08:15:00Z",
        )
        for i in range(n)
    ]


async def fill(path: Path, recs: list[Record]) -> list[bytes]:
    """Append to the outbox; return the bodies as the outbox leases them (with seq)."""
    async with Outbox(path, max_bytes=8 << 30) as box:
        for start in range(0, len(recs), 5000):
            await box.append(recs[start : start + 5000])
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT seq, body FROM records ORDER BY seq").fetchall()
    return [body[:-1] + b',"seq":' + str(seq).encode() + b"}" for seq, body in rows]


async def ceiling(url: str, bodies: list[bytes]) -> tuple[float, int]:
    """The same batches by a bare httpx loop: no outbox, no forwarder."""
    wire = 0
    headers = {"Authorization": f"Bearer {TOKEN}", "X-API-Version": "1"}
    async with httpx.AsyncClient(timeout=60) as client:
        began = time.perf_counter()
        for i in range(0, len(bodies), BATCH):
            raw = encode_batch("bench", f"b{i}", bodies[i : i + BATCH])
            extra = {}
            if len(raw) >= GZIP_MIN:
                raw = await asyncio.to_thread(gzip.compress, raw, GZIP_LEVEL, mtime=0)
                extra = {"Content-Encoding": "gzip"}
            response = await client.post(
                url + "/v1/ingest", content=raw, headers={**headers, **extra}
            )
            response.raise_for_status()
            wire += len(raw)
        return time.perf_counter() - began, wire


# ---------------------------------------------------------------------- child: the drain


async def drain_child(db: Path, url: str, concurrency: int) -> None:
    from agent import logs  # noqa: PLC0415
    from agent.config import parse  # noqa: PLC0415
    from agent.forwarder import Forwarder  # noqa: PLC0415

    logs.configure("warning", "console")

    settings, _ = parse(
        {
            "agent": {"id": "bench", "state_dir": str(db.parent)},
            "upstream": {"url": url, "token": TOKEN, "concurrency": concurrency},
        }
    )
    async with Outbox(db, max_bytes=8 << 30, integrity_check="off") as box:
        total = sum((await box.stats()).rows.values())
        fwd = Forwarder(box, settings.upstream, "bench")
        began = time.perf_counter()
        await fwd.start()
        assert await fwd.drain(3600.0), "drain did not finish"
        seconds = time.perf_counter() - began
        status = fwd.status()
        await fwd.stop()
    print(json.dumps({
        "records": total, "seconds": seconds, "wire_bytes": status["wire_bytes"],
        "accepted": status["records"]["accepted"], "peak_rss_mb": vm_hwm_mb(), "status": status,
    }))  # fmt: skip


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100k records instead of 1M")
    ap.add_argument("--records", type=int, help="override the record count")
    ap.add_argument("--concurrency", type=int, default=1, help="upstream.concurrency")
    ap.add_argument("--child-drain", nargs=2, metavar=("DB", "URL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_drain:
        asyncio.run(drain_child(Path(args.child_drain[0]), args.child_drain[1], args.concurrency))
        return
    n = args.records or (100_000 if args.quick else 1_000_000)
    with tempfile.TemporaryDirectory(prefix="drain-bench-") as tmp:
        work = Path(tmp)
        began = time.perf_counter()
        bodies = asyncio.run(fill(work / "outbox.db", records(n)))
        print(f"filled {n:,} records in {time.perf_counter() - began:.1f} s", file=sys.stderr)

        rx, url = start_receiver(work / "rx-drain.db")
        try:
            out = subprocess.run(
                [sys.executable, __file__, "--child-drain", str(work / "outbox.db"), url,
                 "--concurrency", str(args.concurrency)],
                cwd=ROOT, env=ENV, capture_output=True, check=True,
            )  # fmt: skip
        finally:
            rx.terminate()
            rx.wait()
        drain = json.loads(out.stdout.decode().strip().splitlines()[-1])
        assert drain["accepted"] == n, drain

        rx, url = start_receiver(work / "rx-ceiling.db")
        try:
            ceil_seconds, ceil_wire = asyncio.run(ceiling(url, bodies))
        finally:
            rx.terminate()
            rx.wait()

    rate = n / drain["seconds"]
    ceil_rate = n / ceil_seconds
    print(f"drain:   {n:,} records in {drain['seconds']:.2f} s = {rate:,.0f} records/s, "
          f"{drain['wire_bytes']:,} bytes on the wire, peak RSS {drain['peak_rss_mb']:.0f} MiB "
          f"(concurrency {args.concurrency})")  # fmt: skip
    print(f"ceiling: bare httpx loop {ceil_seconds:.2f} s = {ceil_rate:,.0f} records/s, "
          f"{ceil_wire:,} bytes")  # fmt: skip
    print(json.dumps({
        "benchmark": "drain", "value": round(rate), "unit": "records/s",
        "ceiling": round(ceil_rate), "ratio": round(rate / ceil_rate, 3),
        "peak_rss_mb": round(drain["peak_rss_mb"], 1), "records": n,
        "wire_bytes": drain["wire_bytes"], "concurrency": args.concurrency,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
