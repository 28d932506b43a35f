"""Benchmark: outbox append throughput from many concurrent producers.

Figure: records/s committed by Outbox.append (group commit, synchronous=FULL, WAL) from
50 concurrent producers, each appending small batches as a source would.
Ceiling, measured in the same run on the same disk: raw sqlite3 executemany of the same
rows into the same schema, 1000 rows per transaction, synchronous=FULL, WAL.

    python benchmarks/outbox_append.py [--quick] [--records N] [--producers P] [--chunk C]

The last line printed is one JSON object (benchmark, value, unit, ceiling, ratio, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.outbox import _SCHEMA, Outbox, _row
from agent.records import EntityType, Record, SourceRef

SRC = SourceRef("bench-sap", "sap_ecc", "plant-1000")
RAW_INSERT = (
    "INSERT INTO records (id, entity_id, entity_type, class, created_at, size, body) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
T0 = datetime(2026, 11, 22, tzinfo=UTC)


def make_records(n: int) -> list[Record]:
    """Realistic mix: 70 % meter readings (~350 B), 30 % work orders (~900 B)."""
    rng = random.Random(7)
    out: list[Record] = []
    for i in range(n):
        if i % 10 < 7:
            out.append(
                Record.reading(
                    SRC,
                    EntityType.METER_READING,
                    f"lift-{i % 400}/motor_temp",
                    T0 + timedelta(milliseconds=i),
                    {
                        "value": rng.uniform(20, 90),
                        "unit": "degC",
                        "quality": "good",
                        "asset_remote_id": f"L{i % 400}",
                    },
                )
            )
        else:
            out.append(
                Record.entity(
                    SRC,
                    EntityType.WORK_ORDER,
                    f"{4000000000 + i:012d}",
                    {
                        "title": f"Inspect door operator {i}",
                        "status": "released",
                        "priority": "2",
                        "asset_remote_id": f"{10000000 + i % 5000:018d}",
                        "planned_start": "2026-11-23",
                        "description": "Door reopens intermittently; check light curtain. " * 3,
                    },
                    remote_data={
                        "AUFNR": f"{4000000000 + i:012d}",
                        "AUART": "PM01",
                        "WERKS": "1000",
                    },
                    source_modified_at=T0,
                    modified_precision="day",
                )
            )
    return out


async def agent_run(path: Path, records: list[Record], producers: int, chunk: int) -> float:
    async with Outbox(path, max_bytes=1 << 40) as box:
        shares = [records[p::producers] for p in range(producers)]

        async def produce(share: list[Record]) -> None:
            for i in range(0, len(share), chunk):
                await box.append(share[i : i + chunk])

        t = time.perf_counter()
        await asyncio.gather(*(produce(s) for s in shares))
        elapsed = time.perf_counter() - t
        stored = sum((await box.stats()).rows.values())
        assert stored == len(records), (stored, len(records))
    return elapsed


def ceiling_run(path: Path, records: list[Record]) -> float:
    now = time.time()
    # serialized before timing: the ceiling's advantage (the id_at column is the outbox's)
    rows = [_row(r, now)[:7] for r in records]
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.executescript(_SCHEMA)
    t = time.perf_counter()
    for i in range(0, len(rows), 1000):
        con.execute("BEGIN")
        con.executemany(RAW_INSERT, rows[i : i + 1000])
        con.execute("COMMIT")
    elapsed = time.perf_counter() - t
    con.close()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="50k records (< 30 s)")
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--producers", type=int, default=50)
    ap.add_argument("--chunk", type=int, default=20, help="records per append call")
    ap.add_argument("--dir", help="directory on the disk to measure (default: a temp dir)")
    args = ap.parse_args()
    n = 50_000 if args.quick else args.records
    records = make_records(n)
    avg = sum(len(r.to_json()) for r in records[:2000]) / 2000
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        ceiling_s = ceiling_run(Path(d) / "raw.db", records)
        agent_s = asyncio.run(agent_run(Path(d) / "outbox.db", records, args.producers, args.chunk))
    value = n / agent_s
    ceiling = n / ceiling_s
    print(f"records={n} avg_bytes={avg:.0f} producers={args.producers} chunk={args.chunk}")
    print(f"outbox.append: {agent_s:.2f} s  {value:,.0f} records/s")
    print(f"raw executemany (1000/txn, FULL): {ceiling_s:.2f} s  {ceiling:,.0f} records/s")
    print(
        json.dumps(
            {
                "benchmark": "outbox_append",
                "value": round(value),
                "unit": "records/s",
                "ceiling": round(ceiling),
                "ratio": round(value / ceiling, 3),
                "records": n,
                "producers": args.producers,
                "chunk": args.chunk,
                "avg_record_bytes": round(avg),
            }
        )
    )


if __name__ == "__main__":
    main()
