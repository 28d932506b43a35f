"""Connection URLs, secrets, error classes, read-only guards and credential failures."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import structlog
from sqlalchemy import Float, text
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import create_async_engine

from agent.errors import ConfigError, ReauthorizationRequired, TransientError
from agent.outbox import Outbox
from agent.sources.sql import SqlSourceConfig
from agent.sources.sql.engine import build_url, classify, is_auth_error, masked
from agent.sources.sql.keyset import pack, unpack
from agent.sources.sql.model import Watermark, shift_back
from agent.sources.sql.profiles.sap_tables import sap_date, sap_datetime, sap_time
from tests.helpers.waiting import wait_for
from tests.sql.conftest import MARIA_URL, make_source, outbox_records

URLS = [
    "postgresql+asyncpg://edge@db.example:5432/prd",
    "mysql+asyncmy://edge@db.example:3306/cmms",
    "mssql+aioodbc://edge@sql.example:1433/MAXIMO?driver=ODBC+Driver+18+for+SQL+Server"
    "&ApplicationIntent=ReadOnly",
    "oracle+oracledb_async://edge@ora.example:1521/?service_name=PRD",
    "hana+hdbcli://edge@hana.example:30015",
    "sqlite+aiosqlite:///var/lib/cmms.db?mode=ro&uri=true",
]


def _config(url: str, tmp_path: Path, secret: str = "s3cr3t!@:/") -> SqlSourceConfig:
    pw = tmp_path / "db.pw"
    pw.write_text(secret + "\n")
    pw.chmod(0o600)
    return SqlSourceConfig.model_validate(
        {"type": "sql", "profile": "sap_ecc", "url": url, "password_file": str(pw)}
    )


@pytest.mark.parametrize("url", URLS)
def test_password_file_is_merged_and_masked(url: str, tmp_path: Path):
    config = _config(url, tmp_path)
    full = build_url(config)
    assert full.password == "s3cr3t!@:/"
    shown = masked(full)
    assert "s3cr3t" not in shown
    assert "***" in shown or full.username is None
    assert "s3cr3t" not in repr(config)


def test_password_in_url_is_refused():
    with pytest.raises(ValueError, match="password_file"):
        SqlSourceConfig.model_validate(
            {"type": "sql", "profile": "sap_ecc", "url": "postgresql+asyncpg://u:pw@h/db"}
        )


class _DriverError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)


class _PgAuth(Exception):
    sqlstate = "28P01"


@pytest.mark.parametrize(
    ("exc", "auth"),
    [
        (_DriverError(1045, "Access denied for user"), True),  # MySQL/MariaDB
        (_DriverError(18456, "Login failed for user"), True),  # SQL Server
        (_DriverError(1017, "ORA-01017: invalid username/password"), True),  # Oracle
        (_DriverError(10, "authentication failed"), True),  # SAP HANA
        (_PgAuth("password authentication failed"), True),  # PostgreSQL
        (_DriverError(2003, "Can't connect to server"), False),
        (ConnectionRefusedError(111, "refused"), False),
    ],
)
def test_error_classification(exc: Exception, auth: bool):
    assert is_auth_error(exc) is auth
    assert isinstance(classify(exc), ReauthorizationRequired if auth else TransientError)


def test_sap_value_conventions():
    assert sap_date("00000000") is None
    assert sap_date("        ") is None
    with pytest.raises(ValueError, match="day is out of range"):
        sap_date("20260230")
    assert sap_time("240000") == (23, 59, 59)
    at = sap_datetime("20260701", "120000", ZoneInfo("Europe/Berlin"))
    assert at is not None
    assert at.isoformat() == "2026-07-01T10:00:00+00:00"  # CEST
    assert shift_back("sap_date", "20260301", 86400) == "20260228"
    assert shift_back("sap_datetime", "20260301000010", 20) == "20260228235950"


def test_watermark_and_keyset_round_trip():
    mark = Watermark(datetime(2026, 1, 2, 3, 4, 5), ("000001", 7, Decimal("1.5"), b"\x00\x01"))
    assert Watermark.decode(mark.encode()) == mark
    keys = [f"{i:012d}" for i in range(20000)]
    assert list(unpack(pack(keys))) == keys
    assert len(pack(keys)) < 20000 * 4  # compact: a few bytes per zero-padded key


async def test_rejected_credentials_mean_reauthorization(tmp_path: Path, outbox: Outbox):
    """The password changed on the server: state and a connection_status record."""
    user, db = f"edge_{uuid.uuid4().hex[:8]}", f"t_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(MARIA_URL)
    async with admin.begin() as conn:
        await conn.execute(text(f"CREATE DATABASE `{db}`"))
        await conn.execute(text(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'new-password'"))
        await conn.execute(text(f"GRANT SELECT ON `{db}`.* TO '{user}'@'%'"))
    config = _config(f"mysql+asyncmy://{user}@127.0.0.1:3306/{db}", tmp_path, "old-password")
    source = make_source(config)
    task = asyncio.create_task(source.run(outbox))
    try:
        with structlog.testing.capture_logs() as logs:
            await wait_for(
                lambda: source.health().health.state == "reauthorization_required", what="reauth"
            )
            await wait_for(
                lambda: any(
                    r["entity_type"] == "connection_status" for r in outbox_records(outbox)
                ),
                what="connection_status record",
            )
        status = source.status()
        assert "old-password" not in str(status)
        assert "old-password" not in str(logs)
        assert status["entities"]["work_orders"]["status"] == "failed"
        rec = next(r for r in outbox_records(outbox) if r["entity_type"] == "connection_status")
        assert rec["data"]["state"] == "reauthorization_required"
        assert rec["data"]["reason"] == "credentials_rejected"
        assert not task.done(), "the source keeps running (and retrying slowly)"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with admin.begin() as conn:
            await conn.execute(text(f"DROP USER '{user}'@'%'"))
            await conn.execute(text(f"DROP DATABASE `{db}`"))
        await admin.dispose()


async def test_synchronous_driver_runs_in_worker_threads(tmp_path: Path, outbox: Outbox):
    """The path SAP HANA (hdbcli) takes, exercised with the synchronous sqlite driver."""
    db = tmp_path / "cmms.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE wo (wonum TEXT PRIMARY KEY, descr TEXT, changed_at TEXT)")
    con.executemany(
        "INSERT INTO wo VALUES (?, ?, ?)", [(f"W{i}", f"job {i}", "2026-11-20") for i in range(7)]
    )
    con.commit()
    con.close()
    config = SqlSourceConfig.model_validate(
        {
            "type": "sql",
            "profile": "declarative",
            "url": f"sqlite:///{db}",
            "chunk_size": 3,
            "initial_window": None,
            "entities": {
                "wo": {
                    "entity_type": "work_order",
                    "table": "wo",
                    "key": ["wonum"],
                    "cursor": "changed_at",
                    "fields": {"title": "descr"},
                }
            },
        }
    )
    source = make_source(config, name="cmms")
    try:
        await source.sync_once(outbox)
        assert source.db.threaded
        with pytest.raises(Exception, match=r"readonly|read-only"):
            await source.db.fetch(text("DELETE FROM wo"))
    finally:
        await source.aclose()
    assert sorted(r["remote_id"] for r in outbox_records(outbox)) == [f"W{i}" for i in range(7)]


async def test_fetch_gives_the_values_sqlalchemy_gives(backend, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Rows straight from the driver on the plain path; typed columns still converted."""
    config = SqlSourceConfig.model_validate(
        {
            "type": "sql",
            "profile": "declarative",
            "url": backend.url,
            "entities": {
                "wo": {"entity_type": "work_order", "table": "wo", "key": ["k"], "cursor": "t"}
            },
        }
    )
    db = make_source(config, name="cmms").db
    db.open()
    plain = text("SELECT 'A1 ' AS k, 7 AS n, 2.50 AS q, NULL AS z")
    # A Float column over a DECIMAL value: SQLAlchemy converts it (a result processor on
    # asyncpg), so the driver's row must not be taken as it is.
    typed = text("SELECT 2.50 AS q").columns(q=Float())
    # Which path each query takes: SQLAlchemy's rows are built only for the typed one.
    built: list[int] = []
    all_rows = CursorResult.all

    def counting_all(self: CursorResult[Any]) -> Any:
        built.append(1)
        return all_rows(self)

    try:
        for stmt, wrapped in ((plain, 0), (typed, 1)):
            async with backend.engine.connect() as conn:
                expected = [dict(r._mapping) for r in (await conn.execute(stmt)).all()]
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(CursorResult, "all", counting_all)
                got = await db.fetch(stmt)
            assert len(built) == wrapped, stmt
            built.clear()
            assert got == expected
            assert [type(v) for v in got[0].values()] == [type(v) for v in expected[0].values()]
        assert type((await db.fetch(typed))[0]["q"]) is float
        assert (await db.fetch(plain))[0]["q"] == Decimal("2.50")
    finally:
        await db.close()


async def test_an_error_while_fetching_rows_is_classified(tmp_path: Path):
    """A driver error raised by fetchall (not execute) still becomes a TransientError.

    The synchronous sqlite driver evaluates rows lazily: json() of a bad value fails on
    the second row, during the fetch that the plain-rows path performs.
    """
    config = SqlSourceConfig.model_validate(
        {
            "type": "sql",
            "profile": "declarative",
            "url": f"sqlite:///{tmp_path / 'x.db'}",
            "entities": {
                "wo": {"entity_type": "work_order", "table": "wo", "key": ["k"], "cursor": "t"}
            },
        }
    )
    db = make_source(config, name="cmms").db
    db.open()
    try:
        bad = text("SELECT json(v) AS j FROM (SELECT '1' AS v UNION ALL SELECT '{bad')")
        with pytest.raises(TransientError, match="malformed JSON"):
            await db.fetch(bad)
        assert await db.fetch(text("SELECT 1 AS ok")) == [{"ok": 1}]  # the pool recovered
    finally:
        await db.close()


def test_missing_driver_is_a_config_error(tmp_path: Path):
    config = _config("hana+hdbcli://edge@hana.example:30015", tmp_path)
    source = make_source(config)
    with pytest.raises(ConfigError, match="not installed"):
        source.db.open()
