"""The declarative profile (SQLite CMMS, PostgreSQL, MariaDB), the maximo profile, mappings."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from agent import config as cfg
from agent.errors import ConfigError
from agent.outbox import Outbox
from agent.sources.sql import SqlSourceConfig
from agent.sources.sql.profiles.declarative import remote_id_of
from tests.helpers.cancel import assert_stops_after_swallowed_cancel, swallowing
from tests.sql.conftest import Backend, latest, make_source, outbox_records

NOW = datetime(2026, 11, 20, 8, 0, 0)


def cmms_config(url: str, **extra: Any) -> SqlSourceConfig:
    data: dict[str, Any] = {
        "type": "sql",
        "profile": "declarative",
        "url": url,
        "initial_window": None,
        "entities": {
            "work_orders": {
                "entity_type": "work_order",
                "table": "wo",
                "key": ["wonum"],
                "cursor": "changed_at",
                "fields": {"title": "descr", "status": "status", "asset_remote_id": "equip"},
                "deleted_when": {"deleted": "1"},
            }
        },
    }
    data.update(extra)
    return SqlSourceConfig.model_validate(data)


def sqlite_cmms(path: Path, rows: list[tuple[Any, ...]]) -> str:
    con = sqlite3.connect(path)
    con.execute(
        "CREATE TABLE wo (wonum TEXT PRIMARY KEY, descr TEXT, status TEXT, equip TEXT, "
        "zz_contract TEXT, deleted INTEGER DEFAULT 0, changed_at TIMESTAMP)"
    )
    con.executemany("INSERT INTO wo VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    return f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true"


def wo_row(i: int, at: datetime, **kw: Any) -> tuple[Any, ...]:
    return (f"WO-{i:04d}", kw.get("descr", f"job {i}"), kw.get("status", "OPEN"), "PUMP-1",
            kw.get("zz", "C-77"), kw.get("deleted", 0), at.isoformat(sep=" "))  # fmt: skip


async def test_sqlite_cmms_with_shared_timestamps_and_mappings(tmp_path: Path, outbox: Outbox):
    rows = [wo_row(i, NOW if i % 2 else NOW + timedelta(seconds=1)) for i in range(9)]
    url = sqlite_cmms(tmp_path / "cmms.db", rows)
    mapping = {
        "rename": {"title": "name"},
        "drop": ["status"],
        "custom": {"contract": "ZZ_CONTRACT"},
    }
    source = make_source(
        cmms_config(url, chunk_size=2, mappings={"work_orders": mapping}), name="cmms"
    )
    try:
        await source.sync_once(outbox)
        recs = latest(outbox, "work_order")
        assert sorted(recs) == [f"WO-{i:04d}" for i in range(9)]
        rec = recs["WO-0003"]
        assert rec["data"] == {"name": "job 3", "asset_remote_id": "PUMP-1"}
        assert rec["custom"] == {"contract": "C-77"}
        assert "status" not in rec["remote_data"]
        assert rec["source_modified_at"] == "2026-11-20T08:00:00.000Z"
        # The database is opened read-only: writes through the source's engine fail.
        with pytest.raises(Exception, match=r"readonly|read-only|attempt to write"):
            await source.db.fetch(text("DELETE FROM wo"))
    finally:
        await source.aclose()
    assert len(outbox_records(outbox)) == 9


async def test_declarative_on_server_databases(backend: Backend, outbox: Outbox):
    table = f"wo_{backend.schema or 'x'}"
    async with backend.engine.begin() as conn:
        if backend.schema:
            await conn.execute(text(f'SET search_path TO "{backend.schema}"'))
        await conn.execute(
            text(
                f"CREATE TABLE {table} (wonum VARCHAR(20) PRIMARY KEY, descr VARCHAR(80), "
                "status VARCHAR(10), equip VARCHAR(20), zz_contract VARCHAR(10), "
                "deleted INT DEFAULT 0, changed_at TIMESTAMP(6) NULL)"
            )
        )
        for i in range(7):
            await conn.execute(
                text(f"INSERT INTO {table} VALUES (:w, :d, 'OPEN', 'P', 'C', 0, :c)"),
                {"w": f"WO-{i}", "d": f"job {i}", "c": NOW},
            )
    qualified = f"{backend.schema}.{table}" if backend.schema else table
    config = cmms_config(backend.url, chunk_size=3, reconcile_interval="1d")
    ent = config.entities["work_orders"].model_copy(update={"table": qualified})
    config = config.model_copy(update={"entities": {"work_orders": ent}})
    source = make_source(config, name="cmms")
    try:
        await source.sync_once(outbox, reconcile=True)
        async with backend.engine.begin() as conn:
            await conn.execute(
                text(f"UPDATE {qualified} SET deleted = 1, changed_at = :c WHERE wonum = 'WO-1'"),
                {"c": NOW + timedelta(minutes=1)},
            )
            await conn.execute(text(f"DELETE FROM {qualified} WHERE wonum = 'WO-2'"))
        await source.sync_once(outbox, reconcile=True)
        # The source's own sessions are read-only.
        with pytest.raises(Exception, match=r"(?i)read.only"):
            await source.db.fetch(text(f"DELETE FROM {qualified}"))
    finally:
        await source.aclose()
    recs = latest(outbox, "work_order")
    assert sorted(recs) == [f"WO-{i}" for i in range(7)]
    assert recs["WO-1"]["op"] == "delete"
    assert recs["WO-2"]["op"] == "delete"
    assert recs["WO-2"]["data"] == {"deleted": True, "reason": "not_found_in_source"}
    assert [r["op"] for r in recs.values()].count("upsert") == 5


@pytest.mark.parametrize(
    "query",
    [
        "DELETE FROM wo",
        "SELECT 1; DROP TABLE wo",
        "UPDATE wo SET x = 1",
        "SELECT * INTO copy FROM wo",
        "WITH x AS (DELETE FROM wo RETURNING *) SELECT * FROM x",
    ],
)
def test_non_select_queries_are_refused_at_load(query: str):
    data = {
        "upstream": {"url": "https://example.invalid", "token": "t"},
        "sources": {
            "cmms": {
                "type": "sql",
                "profile": "declarative",
                "url": "sqlite+aiosqlite:///x.db",
                "entities": {
                    "wo": {"entity_type": "work_order", "query": query, "key": ["a"], "cursor": "b"}
                },
            }
        },
    }
    with pytest.raises(ConfigError) as err:
        cfg.parse(data)
    keys = [k for k, _ in err.value.problems]
    assert keys == ["sources.cmms.entities.wo.query"], err.value.problems


def test_select_with_comments_and_strings_is_accepted():
    ent = {
        "entity_type": "work_order",
        "query": "-- open jobs\nSELECT w.*, 'delete; me' AS note FROM wo w WHERE status <> 'X';",
        "key": ["wonum"],
        "cursor": "changed_at",
    }
    config = SqlSourceConfig.model_validate(
        {
            "type": "sql",
            "profile": "declarative",
            "url": "sqlite+aiosqlite:///x",
            "entities": {"wo": ent},
        }
    )
    assert config.entities["wo"].query is not None


async def test_maximo_rowstamp(pg: Backend, outbox: Outbox):
    s = pg.schema
    async with pg.engine.begin() as conn:
        await conn.execute(
            text(
                f'CREATE TABLE "{s}"."WORKORDER" ("WORKORDERID" BIGINT, "WONUM" VARCHAR(25), '
                '"SITEID" VARCHAR(8), "ORGID" VARCHAR(8), "DESCRIPTION" VARCHAR(100), '
                '"STATUS" VARCHAR(16), "WORKTYPE" VARCHAR(5), "WOPRIORITY" INT, '
                '"ASSETNUM" VARCHAR(25), "LOCATION" VARCHAR(25), "PARENT" VARCHAR(25), '
                '"REPORTDATE" TIMESTAMP, "TARGSTARTDATE" TIMESTAMP, "TARGCOMPDATE" TIMESTAMP, '
                '"SCHEDSTART" TIMESTAMP, "SCHEDFINISH" TIMESTAMP, "ACTSTART" TIMESTAMP, '
                '"ACTFINISH" TIMESTAMP, "STATUSDATE" TIMESTAMP, "CHANGEDATE" TIMESTAMP, '
                '"HISTORYFLAG" SMALLINT, "ROWSTAMP" BIGINT)'
            )
        )
        for i in range(5):
            await conn.execute(
                text(
                    f'INSERT INTO "{s}"."WORKORDER" ("WORKORDERID", "WONUM", "SITEID", '
                    '"DESCRIPTION", "STATUS", "WOPRIORITY", "ASSETNUM", "CHANGEDATE", '
                    "\"HISTORYFLAG\", \"ROWSTAMP\") VALUES (:i, :w, 'BEDFORD', :d, 'WAPPR', 1, "
                    "'11430', :c, 0, :r)"
                ),
                {"i": i, "w": f"{1000 + i}", "d": f"Job {i}", "c": NOW, "r": 100 + i},
            )
    config = SqlSourceConfig.model_validate(
        {"type": "sql", "profile": "maximo", "url": pg.url, "schema": s,
         "include": ["work_orders"], "chunk_size": 2, "timezone": "America/New_York"}
    )  # fmt: skip
    source = make_source(config, name="maximo")
    try:
        await source.sync_once(outbox)
        async with pg.engine.begin() as conn:
            await conn.execute(
                text(f'UPDATE "{s}"."WORKORDER" SET "STATUS" = \'APPR\', "ROWSTAMP" = 200 '
                     "WHERE \"WONUM\" = '1001'")
            )  # fmt: skip
        await source.sync_once(outbox)
    finally:
        await source.aclose()
    recs = latest(outbox, "work_order")
    assert sorted(recs) == [f"BEDFORD/{1000 + i}" for i in range(5)]
    assert recs["BEDFORD/1001"]["data"]["status"] == "APPR"
    assert recs["BEDFORD/1001"]["data"]["asset_remote_id"] == "BEDFORD/11430"
    assert recs["BEDFORD/1001"]["source"]["system"] == "maximo"
    assert recs["BEDFORD/1000"]["source_modified_at"] == "2026-11-20T13:00:00.000Z"
    assert len(outbox_records(outbox)) == 6


async def test_a_stop_swallowed_inside_a_fetch_still_stops_the_sync(
    tmp_path: Path, outbox: Outbox
) -> None:
    """Python 3.11's asyncio.wait_for (asyncmy's connect uses it) can return a result that
    arrived as its task was cancelled and drop the cancellation. Here every fetch after
    the first does that: the source must stop at the next chunk, not read the rest of the
    table (200 chunks of 0.2 s) first."""
    rows = [wo_row(i, NOW + timedelta(seconds=i)) for i in range(400)]
    source = make_source(cmms_config(sqlite_cmms(tmp_path / "cmms.db", rows), chunk_size=2))
    in_fetch = asyncio.Event()
    real = source.db.fetch
    calls = 0

    async def fetch(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return await real(*args, **kwargs)
        return await swallowing(lambda: real(*args, **kwargs), in_fetch)

    source.db.fetch = fetch  # type: ignore[method-assign]
    task = asyncio.create_task(source.run(outbox))
    try:
        await assert_stops_after_swallowed_cancel(task, in_fetch, "the SQL sync")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await source.aclose()
    assert calls < 10, f"{calls} fetches: the sync read on after its stop"


def quarantined(box: Outbox) -> list[tuple[str, str]]:
    """(reason, detail) of every quarantined input."""
    con = sqlite3.connect(box.path)
    try:
        return [(r, str(d)) for r, d in con.execute("SELECT reason, context FROM quarantine")]
    finally:
        con.close()


async def test_rows_without_a_key_are_counted_not_merged(tmp_path: Path, outbox: Outbox):
    """A NULL or blank key is no identity: such rows once all became one entity ``"None"``
    (or ``""``) upstream, each overwriting the last, and a NULL key at a chunk's end
    stopped the entity's sync for good (keyset paging cannot pass a NULL). Now a blank key
    is quarantined with the column named, NULL keys are left out of the feed and counted
    in sync status with a warning, and the keyed rows beside them flow on."""
    at = NOW.isoformat(sep=" ")
    rows = [wo_row(i, NOW) for i in range(3)]
    rows += [(None, "no key", "OPEN", "P", "C", 0, at)] * 2
    rows += [("   ", "blank key", "OPEN", "P", "C", 0, at)]
    path = tmp_path / "cmms.db"
    con = sqlite3.connect(path)  # no PRIMARY KEY: a CMMS view can hold any of these
    con.execute(
        "CREATE TABLE wo (wonum TEXT, descr TEXT, status TEXT, equip TEXT, zz_contract TEXT, "
        "deleted INTEGER DEFAULT 0, changed_at TIMESTAMP)"
    )
    con.executemany("INSERT INTO wo VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    url = f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true"
    source = make_source(cmms_config(url, chunk_size=2), name="cmms")
    try:
        await source.sync_once(outbox)
        status = source.entities["work_orders"].status()
    finally:
        await source.aclose()
    assert sorted(latest(outbox, "work_order")) == ["WO-0000", "WO-0001", "WO-0002"]
    assert status["rows_without_key"] == 2, status
    bad = quarantined(outbox)
    assert len(bad) == 1, bad
    assert "'wonum' is blank" in bad[0][1], bad


def test_a_composite_key_with_a_null_part_names_it() -> None:
    assert remote_id_of(["1000", 7, "A  "]) == "1000/7/A"
    with pytest.raises(ValueError, match="key column 'site' is NULL"):
        remote_id_of(["WO-1", None], ["wonum", "site"])


async def test_interval_columns_are_delivered_as_iso_durations(backend: Backend, outbox: Outbox):
    """PostgreSQL ``interval`` and MariaDB ``TIME`` arrive as Python timedeltas; they used to
    fail every row that held one (not JSON serializable)."""
    table = f"wo_iv_{backend.schema or 'x'}"
    kind = "INTERVAL" if backend.name == "postgresql" else "TIME"
    async with backend.engine.begin() as conn:
        if backend.schema:
            await conn.execute(text(f'SET search_path TO "{backend.schema}"'))
        await conn.execute(
            text(
                f"CREATE TABLE {table} (wonum VARCHAR(20) PRIMARY KEY, descr VARCHAR(80), "
                f"status VARCHAR(10), equip VARCHAR(20), downtime {kind}, "
                "changed_at TIMESTAMP(6) NULL)"
            )
        )
        await conn.execute(
            text(f"INSERT INTO {table} VALUES ('WO-1', 'job', 'OPEN', 'P', '26:30:05', :c)"),
            {"c": NOW},
        )
    qualified = f"{backend.schema}.{table}" if backend.schema else table
    config = cmms_config(backend.url)
    ent = config.entities["work_orders"].model_copy(
        update={
            "table": qualified,
            "fields": {"title": "descr", "downtime": "downtime"},
            "deleted_when": {},
        }
    )
    source = make_source(config.model_copy(update={"entities": {"work_orders": ent}}))
    try:
        await source.sync_once(outbox)
    finally:
        await source.aclose()
    assert quarantined(outbox) == []
    rec = latest(outbox, "work_order")["WO-1"]
    assert rec["data"]["downtime"] == "P1DT2H30M5S"
