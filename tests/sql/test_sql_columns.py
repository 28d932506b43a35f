"""A mapped column the query does not return: the entity fails at its first chunk, naming
source, entity, field and column, and nothing is written (never a null over the cloud's
value). ``check-config --connect`` finds the same against the live database, read-only.

Real PostgreSQL and MariaDB (tests/sql/conftest.py), one private schema/database each.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from agent.__main__ import main
from agent.outbox import Outbox
from agent.sources.sql import SqlSourceConfig
from agent.sources.sql.mapping import MissingColumnsError
from tests.agent_process import toml_dumps
from tests.sql.conftest import Backend, make_source, outbox_records


async def wo_table(backend: Backend) -> str:
    """A work order table without a ``status`` column, with three rows."""
    table = f"cols_{backend.schema or 'x'}"
    async with backend.engine.begin() as conn:
        if backend.schema:
            await conn.execute(text(f'SET search_path TO "{backend.schema}"'))
        await conn.execute(
            text(
                f"CREATE TABLE {table} (wonum VARCHAR(20) PRIMARY KEY, descr VARCHAR(80), "
                "changed_at TIMESTAMP(6) NULL)"
            )
        )
        for i in range(3):
            await conn.execute(
                text(f"INSERT INTO {table} VALUES (:w, 'job', CURRENT_TIMESTAMP)"), {"w": f"W{i}"}
            )
    return f"{backend.schema}.{table}" if backend.schema else table


def source_table(backend: Backend, table: str, **entity: Any) -> dict[str, Any]:
    return {
        "type": "sql",
        "profile": "declarative",
        "url": backend.url,
        "initial_window": "3650d",
        "entities": {
            "work_orders": {
                "entity_type": "work_order",
                "table": table,
                "key": ["wonum"],
                "cursor": "changed_at",
                "fields": {"title": "descr"},
                **entity,
            }
        },
    }


async def test_a_missing_field_column_fails_the_entity_and_writes_nothing(
    backend: Backend, outbox: Outbox
) -> None:
    table = await wo_table(backend)
    data = source_table(backend, table, fields={"title": "descr", "status": "status"})
    source = make_source(SqlSourceConfig.model_validate(data), name="cmms")
    try:
        with pytest.raises(MissingColumnsError) as err:
            await source.sync_once(outbox)
    finally:
        await source.aclose()
    message = str(err.value)
    for part in ("source 'cmms'", "entity 'work_orders'", "fields.status", "column 'status'"):
        assert part in message, message
    assert outbox_records(outbox) == []  # no record with a null status
    assert source.entities["work_orders"].state.status == "failed"
    assert (await outbox.cursor("cmms", "watermark:work_orders")) is None  # cursor unmoved


async def test_a_missing_custom_column_fails_too_and_the_fixed_mapping_syncs(
    pg: Backend, outbox: Outbox
) -> None:
    table = await wo_table(pg)
    data = source_table(pg, table)
    data["mappings"] = {"work_orders": {"custom": {"zz_contract": "ZZCONTRACT"}}}
    source = make_source(SqlSourceConfig.model_validate(data), name="cmms")
    try:
        with pytest.raises(
            MissingColumnsError, match=r"mappings\.work_orders\.custom\.zz_contract"
        ):
            await source.sync_once(outbox)
    finally:
        await source.aclose()
    assert outbox_records(outbox) == []

    del data["mappings"]
    source = make_source(SqlSourceConfig.model_validate(data), name="cmms")
    try:
        await source.sync_once(outbox)
    finally:
        await source.aclose()
    assert sorted(r["remote_id"] for r in outbox_records(outbox)) == ["W0", "W1", "W2"]


async def test_the_running_source_reports_the_mapping_in_its_status(
    pg: Backend, outbox: Outbox
) -> None:
    table = await wo_table(pg)
    data = source_table(pg, table, fields={"title": "descr", "status": "status"})
    source = make_source(SqlSourceConfig.model_validate(data), name="cmms")
    task = asyncio.create_task(source.run(outbox))
    try:
        async with asyncio.timeout(30):
            while source.entities["work_orders"].state.status != "failed":
                await asyncio.sleep(0.05)
        st = source.status()
        assert "fields.status" in st["entities"]["work_orders"]["error"]
        # its only entity fails its passes: the source moves no data and retries
        assert source.health().health.state == "retrying"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await source.aclose()
    assert outbox_records(outbox) == []


def write_config(path: Path, source: dict[str, Any]) -> Path:
    data = {
        "agent": {"id": "t", "state_dir": str(path.parent / "state")},
        "upstream": {"url": "https://up.example", "token": "t"},
        "sources": {"cmms": source},
    }
    path.write_text(toml_dumps(data) + "\n")
    return path


async def test_check_config_connect_finds_missing_columns_read_only(
    backend: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = await wo_table(backend)
    bad = write_config(
        tmp_path / "bad.toml",
        source_table(backend, table, fields={"title": "descr", "status": "status"}),
    )
    # Without --connect the file is fine: only the database knows its columns.
    assert await asyncio.to_thread(main, ["check-config", str(bad)]) == 0
    assert await asyncio.to_thread(main, ["check-config", "--connect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "sources.cmms.entities.work_orders.fields.status: column 'status' is not in" in err
    assert "Traceback" not in err

    good = write_config(tmp_path / "good.toml", source_table(backend, table))
    assert await asyncio.to_thread(main, ["check-config", "--connect", str(good)]) == 0
    assert "--connect OK" in capsys.readouterr().out
    async with backend.engine.connect() as conn:  # nothing changed in the database
        assert (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar() == 3


async def test_check_config_connect_names_an_unreachable_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = {
        "type": "sql",
        "profile": "declarative",
        "url": "postgresql+asyncpg://edge@127.0.0.1:1/none",
        "query_timeout": "5s",
        "entities": {
            "wo": {"entity_type": "work_order", "table": "wo", "key": ["k"], "cursor": "c"}
        },
    }
    conf = write_config(tmp_path / "c.toml", source)
    assert await asyncio.to_thread(main, ["check-config", "--connect", str(conf)]) == 2
    err = capsys.readouterr().err
    assert "sources.cmms" in err
    assert "Traceback" not in err
