"""Initial sync of a work-order table from PostgreSQL into the outbox, against a ceiling.

    python benchmarks/sql_initial_sync.py [--quick] [--rows N]

The agent runs with the C record builder when it is compiled (``record_builder`` in the
result says which); ``EDGE_AGENT_PURE_PYTHON=1`` measures the pure-Python one.

Builds a private schema with N work orders (1M; 100k with --quick) in the PostgreSQL at
127.0.0.1:5432 (db ``test``), then, each in its own process so peak RSS is its own:

* agent:   a ``declarative`` SQL source doing its initial sync into a fresh outbox
           (records, content hashes, dedupe, watermark commits, chunk by chunk);
* ceiling: a plain keyset-paged SELECT of the same rows plus batched inserts of their
           JSON into SQLite (WAL, synchronous=FULL), no agent code.

Agent and ceiling runs alternate (``--repeat``, default 2) and the fastest of each counts,
so load from other processes on the machine does not decide the ratio.
RSS flatness: the agent also runs on a table a tenth the size; ``rss_growth`` is the
ratio of peak RSS (large / small) and should stay near 1. The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
ROOT = Path(__file__).resolve().parent.parent


async def setup(schema: str, tables: dict[str, int]) -> None:
    engine = create_async_engine(PG)
    async with engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        for name, rows in tables.items():
            await conn.execute(
                text(
                    f'CREATE TABLE "{schema}".{name} (wonum varchar(20) PRIMARY KEY, '
                    "descr varchar(80), status varchar(10), equip varchar(20), "
                    "priority int, zz_contract varchar(10), deleted int, changed_at timestamp)"
                )
            )
            # Timestamps repeat (every 7 rows share one) so chunk borders split ties.
            await conn.execute(
                text(
                    f"INSERT INTO \"{schema}\".{name} SELECT lpad(i::text, 12, '0'), "
                    "'Replace door motor on lift ' || i, 'OPEN', 'LIFT-' || (i % 977), "
                    "i % 5, 'C-' || (i % 100), 0, "
                    "timestamp '2026-01-01' + ((i / 7) || ' seconds')::interval "
                    f"FROM generate_series(1, {rows}) i"
                )
            )
            await conn.execute(text(f'CREATE INDEX ON "{schema}".{name} (changed_at, wonum)'))
            await conn.execute(text(f'ANALYZE "{schema}".{name}'))
    await engine.dispose()


async def teardown(schema: str) -> None:
    engine = create_async_engine(PG)
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    await engine.dispose()


# ---------------------------------------------------------------------- children


async def run_agent(schema: str, table: str, out_dir: Path) -> int:
    from agent.outbox import Outbox  # noqa: PLC0415 - the ceiling child must not pay for it
    from agent.sources.base import SourceContext  # noqa: PLC0415
    from agent.sources.sql import SqlSource, SqlSourceConfig  # noqa: PLC0415

    config = SqlSourceConfig.model_validate(
        {
            "type": "sql",
            "profile": "declarative",
            "url": PG,
            "initial_window": None,
            "reconcile_interval": None,
            "entities": {
                "work_orders": {
                    "entity_type": "work_order",
                    "table": f"{schema}.{table}",
                    "key": ["wonum"],
                    "cursor": "changed_at",
                    "fields": {
                        "title": "descr",
                        "status": "status",
                        "asset_remote_id": "equip",
                        "priority": "priority",
                    },
                }
            },
        }
    )
    source = SqlSource("bench", config, SourceContext("bench", "site"))
    async with Outbox(out_dir / "outbox.db", max_bytes=1 << 40) as box:
        try:
            status = await source.sync_once(box)
        finally:
            await source.aclose()
    return int(status["work_orders"]["progress"]["rows"])


async def run_ceiling(schema: str, table: str, out_dir: Path) -> int:
    import orjson  # noqa: PLC0415

    engine = create_async_engine(PG)
    db = sqlite3.connect(out_dir / "ceiling.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE r (seq INTEGER PRIMARY KEY, id TEXT, body BLOB)")
    sql = text(
        f'SELECT * FROM "{schema}".{table} WHERE (changed_at, wonum) > (:m, :k) '
        "ORDER BY changed_at, wonum LIMIT 5000"
    )
    m, k, total = datetime(1900, 1, 1), "", 0
    while True:
        async with engine.connect() as conn:
            rows = [dict(r) for r in (await conn.execute(sql, {"m": m, "k": k})).mappings()]
        if not rows:
            break
        batch = [(r["wonum"], orjson.dumps(r, default=str)) for r in rows]
        db.execute("BEGIN")
        db.executemany("INSERT INTO r (id, body) VALUES (?, ?)", batch)
        db.execute("COMMIT")
        total += len(rows)
        m, k = rows[-1]["changed_at"], rows[-1]["wonum"]
    db.close()
    await engine.dispose()
    return total


def child(kind: str, schema: str, table: str) -> None:
    if kind == "agent":
        # Module imports are the daemon's start-up, paid once, not part of a sync; so is
        # its garbage-collector set-up (agent.app.main does the same before it runs).
        import agent.outbox  # noqa: PLC0415
        import agent.sources.sql  # noqa: F401, PLC0415
        from agent.app import tune_gc  # noqa: PLC0415

        tune_gc()
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        run = run_agent if kind == "agent" else run_ceiling
        rows = asyncio.run(run(schema, table, Path(tmp)))
        elapsed = time.perf_counter() - began
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"rows": rows, "seconds": elapsed, "rss_mb": rss_mb}
    if kind == "agent":
        from agent.records import builder_implementation  # noqa: PLC0415

        result["builder"] = builder_implementation()
    print(json.dumps(result))


def spawn(kind: str, schema: str, table: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--schema", schema, "--table", table],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={
            "PYTHONPATH": str(ROOT),
            "PATH": "/usr/bin:/bin",
            # C or pure-Python record builder (agent/records.py): measure either.
            "EDGE_AGENT_PURE_PYTHON": os.environ.get("EDGE_AGENT_PURE_PYTHON", ""),
        },
    )
    if out.returncode != 0:
        sys.exit(f"{kind} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100k rows (< 30 s)")
    parser.add_argument("--rows", type=int, help="override the row count")
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs of agent and ceiling, alternated; best counts"
    )
    parser.add_argument("--child", choices=["agent", "ceiling"], help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    parser.add_argument("--table", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.schema, args.table)
        return
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    small = max(rows // 10, 1000)
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    asyncio.run(setup(schema, {"wo_large": rows, "wo_small": small}))
    agents, ceilings = [], []
    try:
        agent_small = spawn("agent", schema, "wo_small")
        # Alternate the runs and keep the best of each: other load on the machine slows
        # single runs by up to 2x, and it should not decide the ratio.
        for _ in range(args.repeat):
            ceilings.append(spawn("ceiling", schema, "wo_large"))
            agents.append(spawn("agent", schema, "wo_large"))
    finally:
        asyncio.run(teardown(schema))
    agent = min(agents, key=lambda r: r["seconds"])
    ceiling = min(ceilings, key=lambda r: r["seconds"])
    agent["rss_mb"] = max(r["rss_mb"] for r in agents)
    assert agent["rows"] == ceiling["rows"] == rows, (agent, ceiling)
    value = agent["rows"] / agent["seconds"]
    ceil = ceiling["rows"] / ceiling["seconds"]
    print(
        f"agent   {rows:>9,} rows  {agent['seconds']:7.2f} s  {value:>9,.0f} rows/s  "
        f"peak RSS {agent['rss_mb']:.0f} MiB ({small:,} rows: {agent_small['rss_mb']:.0f} MiB)"
    )
    print(
        f"ceiling {rows:>9,} rows  {ceiling['seconds']:7.2f} s  {ceil:>9,.0f} rows/s  "
        f"peak RSS {ceiling['rss_mb']:.0f} MiB"
    )
    print(json.dumps({
        "benchmark": "sql_initial_sync",
        "rows": rows,
        "value": round(value, 1),
        "unit": "rows/s",
        "ceiling": round(ceil, 1),
        "ratio": round(value / ceil, 3),
        "peak_rss_mb": round(agent["rss_mb"], 1),
        "peak_rss_mb_small": round(agent_small["rss_mb"], 1),
        "small_rows": small,
        "rss_growth": round(agent["rss_mb"] / agent_small["rss_mb"], 3),
        "record_builder": agent["builder"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
