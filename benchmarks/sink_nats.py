"""NATS sink benchmark: outbox backlog -> forwarder -> NATS sink -> JetStream, against a
bare nats-py async-publish loop of the same payloads, in the same run.

A 3-node JetStream cluster of private nats-servers runs on loopback (tests/helpers/
natsserver.py). For a 1-replica and a 3-replica stream, in turn: the bare loop publishes
the backlog's bodies (``js.publish_async`` with ``Nats-Msg-Id``, the same window as the
sink's ``max_in_flight``, then waits for every PubAck) into a fresh stream; then the real
forwarder drains an outbox holding the same records (100k, 20k with --quick: 2 versions
each of 50k/10k work orders, so many entities) into another fresh stream. Records/s of
each and the ratio agent/bare per replica count.

    python benchmarks/sink_nats.py [--quick] [--records N] [--window W]

Last line: JSON with benchmark, value (records/s, 3 replicas), unit, ratio (3 replicas),
and the figures of both stream kinds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nats

from agent.forwarder import Forwarder
from agent.outbox import Outbox
from agent.records import EntityType, Record, SourceRef
from agent.sinks.nats import NatsConfig
from tests.helpers.natsserver import NatsServer, cluster, have_nats_server
from tests.helpers.waiting import wait_until


def records(n: int) -> list[Record]:
    src = SourceRef("bench", "sap_ecc", "plant-1")
    entities = max(1, n // 2)
    return [
        Record.entity(
            src,
            EntityType.WORK_ORDER,
            f"{i % entities:012d}",
            {"title": f"Replace door motor {i}", "status": "released", "priority": i % 4},
            source_modified_at="2026-11-21T08:15:00Z",
        )
        for i in range(n)
    ]


async def fill(path: Path, recs: list[Record]) -> list[tuple[str, bytes]]:
    """Append to the outbox; return ``(id, body)`` as the outbox leases them (with seq)."""
    async with Outbox(path, max_bytes=8 << 30) as box:
        for start in range(0, len(recs), 5000):
            await box.append(recs[start : start + 5000])
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT seq, id, body FROM records ORDER BY seq").fetchall()
    return [(rid, body[:-1] + b',"seq":' + str(seq).encode() + b"}") for seq, rid, body in rows]


async def bare(
    urls: list[str], stream: str, replicas: int, bodies: list[tuple[str, bytes]], window: int
) -> float:
    """Seconds for a bare publish_async loop of ``bodies`` into a fresh stream."""
    nc = await nats.connect(servers=urls)
    try:
        js = nc.jetstream(publish_async_max_pending=window, timeout=30)
        await js.add_stream(name=stream, subjects=[f"{stream}.>"], num_replicas=replicas)
        subject = f"{stream}.plant-1.work_order"
        began = time.perf_counter()
        futures = [
            await js.publish_async(subject, body, headers={"Nats-Msg-Id": rid})
            for rid, body in bodies
        ]
        await js.publish_async_completed()
        seconds = time.perf_counter() - began
        acks = await asyncio.gather(*futures)
        assert len(acks) == len(bodies)
        return seconds
    finally:
        await nc.close()


async def agent(urls: list[str], stream: str, replicas: int, db: Path, window: int) -> float:
    """Seconds for the forwarder to drain the outbox at ``db`` into a fresh stream."""
    config = NatsConfig.model_validate({
        "type": "nats", "servers": urls, "stream": stream, "create_stream": True,
        "subject": stream + ".{site}.{entity_type}", "replicas": replicas,
        "max_in_flight": window, "ack_timeout": "30s", "concurrency": 2,
    })  # fmt: skip
    async with Outbox(db, max_bytes=8 << 30, integrity_check="off") as box:
        total = sum((await box.stats()).rows.values())
        fwd = Forwarder(box, config, "bench")
        began = time.perf_counter()
        await fwd.start()
        try:
            assert await fwd.drain(3600.0), "drain did not finish"
            seconds = time.perf_counter() - began
            assert fwd.counters.accepted == total, fwd.status()
        finally:
            await fwd.stop()
    return seconds


def start_cluster(work: Path) -> list[NatsServer]:
    nodes = cluster(work / "nats", 3)
    for node in nodes:
        node.start(wait=False)
    for node in nodes:
        wait_until(
            lambda n=node: n.log_file.exists() and "Server is ready" in n.log_file.read_text(),
            f"{node.name} up", 30,
        )  # fmt: skip
    return nodes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20k records instead of 100k")
    ap.add_argument("--records", type=int, help="override the record count")
    ap.add_argument("--window", type=int, default=256, help="publishes in flight (both)")
    args = ap.parse_args()
    if not have_nats_server():
        sys.exit("nats-server not installed (apt-get install nats-server)")
    n = args.records or (20_000 if args.quick else 100_000)
    recs = records(n)
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="nats-bench-") as tmp:
        work = Path(tmp)
        nodes = start_cluster(work)
        urls = [node.url for node in nodes]
        try:
            for replicas in (1, 3):
                db = work / f"outbox-r{replicas}.db"
                bodies = asyncio.run(fill(db, recs))
                b = asyncio.run(bare(urls, f"BARE{replicas}", replicas, bodies, args.window))
                a = asyncio.run(agent(urls, f"AGENT{replicas}", replicas, db, args.window))
                out[f"r{replicas}"] = {
                    "agent": round(n / a),
                    "bare": round(n / b),
                    "ratio": round(b / a, 3),
                }
                print(f"{replicas} replica(s): agent {n / a:,.0f} records/s ({a:.2f} s), bare "
                      f"publish_async loop {n / b:,.0f} records/s ({b:.2f} s), ratio "
                      f"{b / a:.3f}", file=sys.stderr)  # fmt: skip
        finally:
            for node in nodes:
                node.stop()
    print(json.dumps({
        "benchmark": "sink_nats", "value": out["r3"]["agent"], "unit": "records/s",
        "ceiling": out["r3"]["bare"], "ratio": out["r3"]["ratio"],
        "r1": out["r1"], "r3": out["r3"], "records": n, "window": args.window,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
