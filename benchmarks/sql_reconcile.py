"""One content reconciliation pass over a work-order table in PostgreSQL, against a ceiling.

    python benchmarks/sql_reconcile.py [--quick] [--rows N]

Builds a private schema with N work orders (1M; 25k with --quick) and a table a tenth
that size in the PostgreSQL at 127.0.0.1:5432 (db ``test``). For each table a set-up
process runs the agent's initial sync and its first reconciliation pass into an outbox
(the key set, with field digests) and acknowledges every record, as a delivered outbox
is between passes. Then rows change behind the change column, as a script would (one in
10,000 edited, one in 10,000 deleted: drifts and hard deletes), and, each in its own
process so peak RSS is its own:

* agent:   a copy of the set-up outbox, the ``declarative`` SQL source loaded from it,
           one whole reconciliation pass without pauses (as ``sync --full`` runs it):
           every row read in key order, mapped, hashed and compared with the key set,
           the drifts sent, the deletes found, the key marks committed chunk by chunk;
* ceiling: a plain keyset-paged SELECT of the same rows in the same key order, in chunks
           of the same size, no agent code.

Agent and ceiling runs alternate (``--repeat``, default 2) and the fastest of each counts,
so load from other processes on the machine does not decide the ratio (``cpu_ratio``:
the same for the processes' CPU time, the database server's left out). RSS flatness: the
agent's pass also runs on the small table; ``rss_growth`` is the ratio of peak RSS
(large / small) and should stay near 1. ``key_set_bytes_per_key``: the key set's pages
in the outbox (``source_keys``) per key; ``outbox_bytes_per_key`` counts the whole file
(with the entities' version chain). The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
ROOT = Path(__file__).resolve().parent.parent
CHUNK = 5000
EVERY = 10_000
"""One row in this many is edited behind the change column, one deleted."""


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


async def change(schema: str, table: str) -> None:
    """What no feed sees: edits and deletes that leave the change column alone."""
    engine = create_async_engine(PG)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                f"UPDATE \"{schema}\".{table} SET status = 'CLOSED' "
                f"WHERE wonum::bigint % {EVERY} = 1"
            )
        )
        await conn.execute(
            text(f'DELETE FROM "{schema}".{table} WHERE wonum::bigint % {EVERY} = 2')
        )
    await engine.dispose()


async def teardown(schema: str) -> None:
    engine = create_async_engine(PG)
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    await engine.dispose()


# ---------------------------------------------------------------------- children


def make_source(schema: str, table: str) -> Any:
    from agent.sources.base import SourceContext  # noqa: PLC0415
    from agent.sources.sql import SqlSource, SqlSourceConfig  # noqa: PLC0415

    config = SqlSourceConfig.model_validate(
        {
            "type": "sql",
            "profile": "declarative",
            "url": PG,
            "initial_window": None,
            "reconcile_interval": "1d",
            "chunk_size": CHUNK,
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
    return SqlSource("bench", config, SourceContext("bench", "site"))


async def prepare_outbox(schema: str, table: str, box_path: Path) -> dict[str, Any]:
    """Initial sync, first pass (field digests), every record acknowledged."""
    from agent.outbox import Outbox  # noqa: PLC0415

    source = make_source(schema, table)
    async with Outbox(box_path, max_bytes=1 << 40) as box:
        try:
            await source.sync_once(box, reconcile=True)
            while leased := await box.lease(20_000, 1 << 30):
                await box.ack([x.seq for x in leased])
        finally:
            await source.aclose()
    return measure_outbox(box_path)


def measure_outbox(box_path: Path) -> dict[str, Any]:
    """Keys, the key set's bytes (SQLite's dbstat, where compiled in), the file's bytes."""
    con = sqlite3.connect(box_path)
    try:
        con.execute("VACUUM")
        keys = con.execute("SELECT count(*) FROM source_keys").fetchone()[0]
        try:
            size = con.execute(
                "SELECT sum(pgsize) FROM dbstat WHERE name = 'source_keys'"
            ).fetchone()[0]
        except sqlite3.OperationalError:
            size = None
    finally:
        con.close()
    return {"keys": keys, "key_set_bytes": size, "bytes": box_path.stat().st_size}


async def run_agent(schema: str, table: str, box_path: Path) -> dict[str, Any]:
    from agent.outbox import Outbox  # noqa: PLC0415

    source = make_source(schema, table)
    async with Outbox(box_path, max_bytes=1 << 40) as box:
        try:
            await source.prepare(box)  # loading state is the start-up, not the pass
            began, cpu = time.perf_counter(), time.process_time()
            await source.entities["work_orders"].reconcile(box)
            elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
        finally:
            await source.aclose()
    last = source.entities["work_orders"].reconciler.last
    return {
        "rows": last.rows,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "drifts": last.drifts,
        "deletes": last.deletes,
    }


async def run_ceiling(schema: str, table: str, box_path: Path) -> dict[str, Any]:
    del box_path
    engine = create_async_engine(PG)
    sql = text(f'SELECT * FROM "{schema}".{table} WHERE wonum > :k ORDER BY wonum LIMIT {CHUNK}')
    k, total = "", 0
    began, cpu = time.perf_counter(), time.process_time()
    async with engine.connect() as conn:
        while True:
            rows = [dict(r) for r in (await conn.execute(sql, {"k": k})).mappings()]
            if not rows:
                break
            total += len(rows)
            k = rows[-1]["wonum"]
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    await engine.dispose()
    return {"rows": total, "seconds": elapsed, "cpu_seconds": cpu}


def child(kind: str, schema: str, table: str, box: str) -> None:
    # Module imports are the daemon's start-up, paid once, not part of a pass; so is its
    # garbage-collector set-up (agent.app.main does the same before it runs).
    import agent.outbox  # noqa: PLC0415
    import agent.sources.sql  # noqa: F401, PLC0415
    from agent.app import tune_gc  # noqa: PLC0415

    if kind == "prepare":
        tune_gc()
        result = asyncio.run(prepare_outbox(schema, table, Path(box)))
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "outbox.db"
        shutil.copyfile(box, path)
        if kind == "agent":
            tune_gc()
        run = run_agent if kind == "agent" else run_ceiling
        result = asyncio.run(run(schema, table, path))
    result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def spawn(kind: str, schema: str, table: str, box: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--schema", schema, "--table", table,
         "--box", str(box)],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={
            "PYTHONPATH": str(ROOT),
            "PATH": "/usr/bin:/bin",
            "EDGE_AGENT_PURE_PYTHON": os.environ.get("EDGE_AGENT_PURE_PYTHON", ""),
        },
    )  # fmt: skip
    if out.returncode != 0:
        sys.exit(f"{kind} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="25k rows (< 30 s)")
    parser.add_argument("--rows", type=int, help="override the row count")
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs of agent and ceiling, alternated; best counts"
    )
    parser.add_argument("--child", choices=["prepare", "agent", "ceiling"], help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    parser.add_argument("--table", help=argparse.SUPPRESS)
    parser.add_argument("--box", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.schema, args.table, args.box)
        return
    rows = args.rows or (25_000 if args.quick else 1_000_000)
    small = max(rows // 10, 1000)
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    agents, ceilings = [], []
    with tempfile.TemporaryDirectory() as tmp:
        boxes = {"wo_large": Path(tmp) / "large.db", "wo_small": Path(tmp) / "small.db"}
        asyncio.run(setup(schema, {"wo_large": rows, "wo_small": small}))
        try:
            prepared = {t: spawn("prepare", schema, t, b) for t, b in boxes.items()}
            for table in boxes:
                asyncio.run(change(schema, table))
            agent_small = spawn("agent", schema, "wo_small", boxes["wo_small"])
            # Alternate the runs and keep the best of each: other load on the machine
            # slows single runs by up to 2x, and it should not decide the ratio.
            for _ in range(args.repeat):
                ceilings.append(spawn("ceiling", schema, "wo_large", boxes["wo_large"]))
                agents.append(spawn("agent", schema, "wo_large", boxes["wo_large"]))
        finally:
            asyncio.run(teardown(schema))
    agent = min(agents, key=lambda r: r["seconds"])
    ceiling = min(ceilings, key=lambda r: r["seconds"])
    agent["rss_mb"] = max(r["rss_mb"] for r in agents)
    edited, gone = ((rows - r) // EVERY + 1 for r in (1, 2))  # i % EVERY == 1, == 2
    assert agent["rows"] == ceiling["rows"] == rows - gone, (agent, ceiling)
    assert (agent["drifts"], agent["deletes"]) == (edited, gone), agent
    value = agent["rows"] / agent["seconds"]
    ceil = ceiling["rows"] / ceiling["seconds"]
    large = prepared["wo_large"]
    print(
        f"agent   {agent['rows']:>9,} rows  {agent['seconds']:7.2f} s  {value:>9,.0f} rows/s  "
        f"peak RSS {agent['rss_mb']:.0f} MiB ({small:,} rows: {agent_small['rss_mb']:.0f} MiB); "
        f"{agent['drifts']} drifts, {agent['deletes']} deletes"
    )
    print(
        f"ceiling {ceiling['rows']:>9,} rows  {ceiling['seconds']:7.2f} s  {ceil:>9,.0f} rows/s  "
        f"peak RSS {ceiling['rss_mb']:.0f} MiB"
    )
    per_key = (large["key_set_bytes"] or large["bytes"]) / large["keys"]
    print(
        f"outbox  {large['keys']:,} keys: key set {per_key:.0f} bytes per key; whole file "
        f"{large['bytes'] / 2**20:.0f} MiB ({large['bytes'] / large['keys']:.0f} bytes per key)"
    )
    print(json.dumps({
        "benchmark": "sql_reconcile",
        "rows": agent["rows"],
        "value": round(value, 1),
        "unit": "rows/s",
        "ceiling": round(ceil, 1),
        "ratio": round(value / ceil, 3),
        "cpu_ratio": round(ceiling["cpu_seconds"] / agent["cpu_seconds"], 3),
        "peak_rss_mb": round(agent["rss_mb"], 1),
        "peak_rss_mb_small": round(agent_small["rss_mb"], 1),
        "small_rows": agent_small["rows"],
        "rss_growth": round(agent["rss_mb"] / agent_small["rss_mb"], 3),
        "drifts": agent["drifts"],
        "deletes": agent["deletes"],
        "key_set_bytes_per_key": round(per_key, 1),
        "outbox_bytes_per_key": round(large["bytes"] / large["keys"], 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
