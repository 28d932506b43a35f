"""A SQL source's memory is bounded by its chunks, not by the table: many rows or wide rows.

Real PostgreSQL (private schema), the real source and outbox; peak RSS of this process
from the kernel's high-water mark (tests/helpers/rss.py). Wide values are
``repeat(md5(i), n)``: TOAST stores them compressed, so the table is quick to build, but
every value read is its full width.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from agent.outbox import Outbox
from tests.helpers.rss import MIB, RssPeak
from tests.sql.conftest import Backend, make_source
from tests.sql.test_sql_declarative import cmms_config


async def _table(pg: Backend, rows: int, width: int) -> str:
    table = f'"{pg.schema}".wo'
    async with pg.engine.begin() as conn:
        await conn.execute(
            text(
                f"CREATE TABLE {table} (wonum VARCHAR(20) PRIMARY KEY, descr TEXT, "
                "status VARCHAR(10), equip VARCHAR(20), zz_contract VARCHAR(10), "
                "deleted INT DEFAULT 0, changed_at TIMESTAMP(6) NULL)"
            )
        )
        await conn.execute(
            text(
                f"INSERT INTO {table} SELECT 'WO-' || i, repeat(md5(i::text), {width // 32}), "
                "'OPEN', 'P', 'C', 0, timestamp '2026-11-20 08:00' + i * interval '1 second' "
                f"FROM generate_series(1, {rows}) i"
            )
        )
    return f"{pg.schema}.wo"


async def _sync(pg: Backend, tmp_path: Path, table: str, **extra: object) -> tuple[RssPeak, int]:
    config = cmms_config(pg.url, **extra)
    ent = config.entities["work_orders"].model_copy(update={"table": table})
    config = config.model_copy(update={"entities": {"work_orders": ent}})
    async with Outbox(tmp_path / "outbox.db", max_bytes=1 << 40) as box:
        source = make_source(config, name="cmms")
        try:
            with RssPeak() as rss:
                await source.sync_once(box)
        finally:
            await source.aclose()
        stored = sum((await box.stats()).rows.values())
    return rss, stored


async def test_wide_rows_are_read_in_chunks_of_chunk_max_bytes(pg: Backend, tmp_path: Path):
    """200 rows of 512 KiB (100 MiB of text) with chunk_size 5000: before, one chunk
    held the whole table (+1 GiB RSS for 400 such rows). With chunk_max_bytes = 1 MiB a
    chunk is 2 rows; three chunks are in memory at once (fetching, mapping, committing),
    each value about five times (driver, row, record, envelope bytes, SQLite): measured
    ~+25 MiB; the bound is 48 MiB, a tenth of the unchunked figure."""
    table = await _table(pg, rows=200, width=512 * 1024)
    rss, stored = await _sync(pg, tmp_path, table, chunk_max_bytes="1MiB")
    print("wide rows:", rss.describe())  # shown with -s
    assert stored == 200
    assert rss.growth <= 48 * MIB, rss.describe()


async def test_many_rows_cost_one_chunk_not_the_table(pg: Backend, tmp_path: Path):
    """20,000 rows of 2 KiB (40 MiB of text, ~200 MiB as rows and records) in chunks of
    500 rows (1 MiB): measured ~+30 MiB, and the same for 40,000 rows; the bound is
    64 MiB, a third of what the table costs in memory at once."""
    table = await _table(pg, rows=20_000, width=2048)
    rss, stored = await _sync(pg, tmp_path, table, chunk_size=500)
    print("many rows:", rss.describe())  # shown with -s
    assert stored == 20_000
    assert rss.growth <= 64 * MIB, rss.describe()


def test_widest_row_counts_text_and_binary_by_length() -> None:
    from agent.sources.sql.sync import widest_row  # noqa: PLC0415

    rows = [{"a": "x" * 10, "b": b"\0" * 5, "n": 1, "d": None} for _ in range(5000)]
    assert widest_row(rows) == 10 + 5 + 16 + 16
    rows[-1] = {"a": "x" * 100_000, "b": b"", "n": 1, "d": None}  # the last is always seen
    assert widest_row(rows) == 100_000 + 0 + 16 + 16
