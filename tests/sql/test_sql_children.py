"""Child tables of declarative and maximo entities: their own change column, or none.

A child row that changes without the entity's cursor moving re-reads the entity in ONE
incremental pass when the child declares a cursor (real PostgreSQL and MariaDB, the real
SqlSource and outbox); without one, config insists on reconciliation.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from agent import config as cfg
from agent.errors import ConfigError
from agent.outbox import Outbox
from agent.sources.sql import SqlSourceConfig
from agent.sources.sql.profiles import maximo
from tests.sql.conftest import Backend, latest, make_source

NOW = datetime(2026, 11, 20, 8, 0, 0)


async def run(backend: Backend, *statements: str, **params: Any) -> None:
    async with backend.engine.begin() as conn:
        if backend.schema:
            await conn.execute(text(f'SET search_path TO "{backend.schema}"'))
        for sql in statements:
            await conn.execute(text(sql), params)


def qualified(backend: Backend, name: str) -> str:
    return f"{backend.schema}.{name}" if backend.schema else name


async def cmms(backend: Backend) -> None:
    """Work orders, a 1:1 text table and 1:N tasks, each with its own change time."""
    await run(
        backend,
        "CREATE TABLE wo (wonum VARCHAR(20) PRIMARY KEY, status VARCHAR(10), "
        "changed_at TIMESTAMP(6) NULL)",
        "CREATE TABLE wo_text (wonum VARCHAR(20) PRIMARY KEY, descr VARCHAR(80), "
        "changed_at TIMESTAMP(6) NULL)",
        "CREATE TABLE tasks (wonum VARCHAR(20), taskid INT, done INT, "
        "changed_at TIMESTAMP(6) NULL, PRIMARY KEY (wonum, taskid))",
    )
    for i in range(5):
        await run(
            backend,
            "INSERT INTO wo VALUES (:w, 'OPEN', :c)",
            "INSERT INTO wo_text VALUES (:w, :d, :c)",
            "INSERT INTO tasks VALUES (:w, 1, 0, :c)",
            "INSERT INTO tasks VALUES (:w, 2, 0, :c)",
            w=f"WO-{i}",
            d=f"job {i}",
            c=NOW,
        )


def cmms_config(backend: Backend, *, text_cursor: bool = True, **extra: Any) -> SqlSourceConfig:
    tasks = qualified(backend, "tasks")
    query = (
        f"SELECT w.*, (SELECT COUNT(*) FROM {tasks} t WHERE t.wonum = w.wonum AND t.done = 0)"
        f" AS open_tasks FROM {qualified(backend, 'wo')} w"
    )
    entity = {
        "entity_type": "work_order",
        "query": query,
        "key": ["wonum"],
        "cursor": "changed_at",
        "fields": {"title": "text.descr", "status": "status", "open_tasks": "open_tasks"},
        "children": {
            "text": {"table": qualified(backend, "wo_text"), "on": {"wonum": "wonum"},
                     "cursor": "changed_at", "columns": ["descr"]},
            "tasks": {"table": tasks, "on": {"wonum": "wonum"}, "key": ["wonum", "taskid"],
                      "cursor": "changed_at"},
        },
    }  # fmt: skip
    if not text_cursor:
        del entity["children"]["text"]["cursor"]
    data = {"type": "sql", "profile": "declarative", "url": backend.url,
            "initial_window": None, "entities": {"work_orders": entity}, **extra}  # fmt: skip
    return SqlSourceConfig.model_validate(data)


async def test_declarative_child_changes_are_seen_in_one_pass(backend: Backend, outbox: Outbox):
    await cmms(backend)
    source = make_source(cmms_config(backend, chunk_size=2), name="cmms")
    later = NOW + timedelta(minutes=5)
    try:
        await source.sync_once(outbox)
        first = latest(outbox, "work_order")
        assert first["WO-1"]["data"] == {"title": "job 1", "status": "OPEN", "open_tasks": 2}
        # The work order rows' own changed_at does not move.
        await run(
            backend,
            "UPDATE wo_text SET descr = 'job 1, edited', changed_at = :c WHERE wonum = 'WO-1'",
            "UPDATE tasks SET done = 1, changed_at = :c WHERE wonum <> 'WO-1' AND taskid = 2",
            c=later,
        )
        status = await source.sync_once(outbox)
        mark = await outbox.cursor("cmms", "watermark:work_orders")
    finally:
        await source.aclose()
    got = latest(outbox, "work_order")
    assert got["WO-1"]["data"]["title"] == "job 1, edited"
    # Four tasks changed in the same instant, chunks of two: none is skipped.
    assert {w: got[w]["data"]["open_tasks"] for w in got} == {
        "WO-0": 1, "WO-1": 2, "WO-2": 1, "WO-3": 1, "WO-4": 1
    }  # fmt: skip
    assert status["work_orders"]["progress"]["stored"] == 5
    assert got["WO-1"]["remote_data"]["text.descr"] == "job 1, edited"
    assert set(mark["feeds"]) == {"main", "child:text", "child:tasks"}
    assert mark["feeds"]["child:tasks"]["k"] == ["WO-4", 2, "WO-4"]


async def test_a_child_without_a_cursor_is_left_to_reconciliation(backend: Backend, outbox: Outbox):
    await cmms(backend)
    source = make_source(cmms_config(backend, text_cursor=False, reconcile_interval="1h"))
    try:
        await source.sync_once(outbox)
        await run(backend, "UPDATE wo_text SET descr = 'unseen' WHERE wonum = 'WO-1'")
        await source.sync_once(outbox)
        feeds = [f.name for f in source.specs[0].feeds]
    finally:
        await source.aclose()
    assert feeds == ["main", "child:tasks"]
    assert latest(outbox, "work_order")["WO-1"]["data"]["title"] == "job 1"


def problems(source: dict[str, Any]) -> list[tuple[str, str]]:
    data = {"upstream": {"url": "https://example.invalid", "token": "t"},
            "sources": {"cmms": source}}  # fmt: skip
    with pytest.raises(ConfigError) as err:
        cfg.parse(data)
    return err.value.problems


def test_child_without_cursor_needs_reconciliation():
    child = {"table": "wo_text", "on": {"wonum": "wonum"}}
    entity = {"entity_type": "work_order", "table": "wo", "key": ["wonum"],
              "cursor": "changed_at", "children": {"text": child}}  # fmt: skip
    source = {"type": "sql", "profile": "declarative", "url": "sqlite+aiosqlite:///x.db",
              "reconcile_interval": None, "entities": {"work_orders": entity}}  # fmt: skip
    [(key, message)] = problems(source)
    assert key == "sources.cmms"
    assert "entities.work_orders.children.text: no cursor and reconcile_interval" in message
    source["reconcile_interval"] = "1d"
    SqlSourceConfig.model_validate(source)


@pytest.mark.parametrize(
    ("profile", "children", "expected"),
    [
        ("declarative", {"work_orders": {}}, "entities.<entity>.children"),
        ("sap_ecc", {"work_orders": {}}, "'children' is for profile 'maximo'"),
        ("maximo", {"orders": {}}, "children: unknown entities ['orders']"),
    ],
)
def test_source_level_children_are_for_maximo(profile: str, children: Any, expected: str):
    source: dict[str, Any] = {"type": "sql", "profile": profile, "url": "sqlite:///x.db",
                              "children": children}  # fmt: skip
    if profile == "declarative":
        source["entities"] = {"wo": {"entity_type": "work_order", "table": "wo",
                                     "key": ["wonum"], "cursor": "changed_at"}}  # fmt: skip
    [(_, message)] = problems(source)
    assert expected in message


def test_child_on_column_the_maximo_table_lacks_names_it():
    child = {"table": "LONGDESCRIPTION", "on": {"LDKEY": "NOSUCH"}, "cursor": "ROWSTAMP"}
    config = SqlSourceConfig.model_validate(
        {"type": "sql", "profile": "maximo", "url": "sqlite:///x.db",
         "children": {"work_orders": {"longdesc": child}}}
    )  # fmt: skip
    with pytest.raises(ConfigError) as err:
        maximo.specs(config, None)  # type: ignore[arg-type]
    [(key, message)] = err.value.problems
    assert key == "children.work_orders"
    assert "WORKORDER has no column 'NOSUCH'" in message


MAXIMO_TYPES = {"WORKORDERID": "BIGINT", "WOPRIORITY": "INT", "HISTORYFLAG": "SMALLINT",
                "ROWSTAMP": "BIGINT"}  # fmt: skip
TIMES = ("DATE", "START", "FINISH")


async def test_maximo_long_description_child(pg: Backend, outbox: Outbox):
    s = pg.schema
    cols = ", ".join(
        f'"{c}" ' + MAXIMO_TYPES.get(c, "TIMESTAMP" if c.endswith(TIMES) else "VARCHAR(100)")
        for c in maximo._COLUMNS["WORKORDER"]
    )
    await run(
        pg,
        f'CREATE TABLE "{s}"."WORKORDER" ({cols})',
        f'CREATE TABLE "{s}"."LONGDESCRIPTION" ("LDKEY" BIGINT, "LDOWNERTABLE" VARCHAR(18), '
        '"LDOWNERCOL" VARCHAR(18), "LDTEXT" TEXT, "ROWSTAMP" BIGINT)',
    )
    for i in range(3):
        await run(
            pg,
            f'INSERT INTO "{s}"."WORKORDER" ("WORKORDERID", "WONUM", "SITEID", "DESCRIPTION", '
            '"STATUS", "CHANGEDATE", "HISTORYFLAG", "ROWSTAMP") '
            "VALUES (:i, :w, 'BEDFORD', 'Job', 'WAPPR', :c, 0, :r)",
            f"INSERT INTO \"{s}\".\"LONGDESCRIPTION\" VALUES (:i, 'WORKORDER', 'DESCRIPTION', "
            ":t, :r)",
            # Another table's long description with the same LDKEY: never joined.
            f"INSERT INTO \"{s}\".\"LONGDESCRIPTION\" VALUES (:i, 'ASSET', 'DESCRIPTION', "
            "'not this one', :r)",
            i=i,
            w=f"{1000 + i}",
            t=f"Long text {i}",
            c=NOW,
            r=100 + i,
        )
    child = {"table": "LONGDESCRIPTION", "on": {"LDKEY": "WORKORDERID"},
             "match": {"LDOWNERTABLE": "WORKORDER", "LDOWNERCOL": "DESCRIPTION"},
             "key": ["LDKEY"], "cursor": "ROWSTAMP", "cursor_kind": "number",
             "columns": ["LDTEXT"]}  # fmt: skip
    config = SqlSourceConfig.model_validate(
        {"type": "sql", "profile": "maximo", "url": pg.url, "schema": s,
         "include": ["work_orders"], "children": {"work_orders": {"longdesc": child}},
         "mappings": {"work_orders": {"custom": {"long_description": "longdesc.LDTEXT"}}}}
    )  # fmt: skip
    source = make_source(config, name="maximo")
    try:
        await source.sync_once(outbox)
        assert latest(outbox, "work_order")["BEDFORD/1001"]["custom"] == {
            "long_description": "Long text 1"
        }
        await run(
            pg,
            f'UPDATE "{s}"."LONGDESCRIPTION" SET "LDTEXT" = \'Rewritten\', "ROWSTAMP" = 500 '
            'WHERE "LDKEY" = 1 AND "LDOWNERTABLE" = \'WORKORDER\'',
        )
        await source.sync_once(outbox)
    finally:
        await source.aclose()
    got = latest(outbox, "work_order")
    assert got["BEDFORD/1001"]["custom"] == {"long_description": "Rewritten"}
    assert got["BEDFORD/1000"]["custom"] == {"long_description": "Long text 0"}
