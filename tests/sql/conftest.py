"""Real PostgreSQL and MariaDB on 127.0.0.1, one private schema/database per test."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from agent.outbox import Outbox
from agent.sources.base import SourceContext
from agent.sources.sql import SqlSource, SqlSourceConfig
from tests.sql.sapdb import SapDb

PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
MARIA_URL = "mysql+asyncmy://root@127.0.0.1:3306/test"
CONTEXT = SourceContext(agent_id="test-agent", site="plant-1000")


@dataclass
class Backend:
    """A private place in a real database server."""

    name: str
    url: str  # what the source config uses
    schema: str | None
    engine: AsyncEngine  # for fixture writes (not read-only)


async def _postgres() -> AsyncIterator[Backend]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_async_engine(PG_URL)
    async with engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield Backend("postgresql", PG_URL, schema, engine)
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await engine.dispose()


async def _mariadb() -> AsyncIterator[Backend]:
    db = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(MARIA_URL)
    async with admin.begin() as conn:
        await conn.execute(text(f"CREATE DATABASE `{db}`"))
    url = f"mysql+asyncmy://root@127.0.0.1:3306/{db}"
    engine = create_async_engine(url)
    try:
        yield Backend("mariadb", url, None, engine)
    finally:
        await engine.dispose()
        async with admin.begin() as conn:
            await conn.execute(text(f"DROP DATABASE `{db}`"))
        await admin.dispose()


@pytest.fixture(params=["postgresql", "mariadb"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Each test runs once on PostgreSQL and once on MariaDB."""
    gen = _postgres() if request.param == "postgresql" else _mariadb()
    backend = await gen.__anext__()
    yield backend
    await gen.aclose()


@pytest.fixture
async def pg() -> AsyncIterator[Backend]:
    """PostgreSQL only."""
    gen = _postgres()
    backend = await gen.__anext__()
    yield backend
    await gen.aclose()


@pytest.fixture
async def sap(backend: Backend) -> SapDb:
    """SAP tables with status texts, in the backend's private schema."""
    db = SapDb(backend.engine, backend.schema)
    await db.create()
    return db


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    """A real outbox in a temporary directory."""
    async with Outbox(tmp_path / "outbox.db") as box:
        yield box


def sql_config(backend: Backend, **extra: Any) -> SqlSourceConfig:
    """A validated sql source config for ``backend``."""
    data: dict[str, Any] = {"type": "sql", "url": backend.url, "profile": "sap_ecc"}
    if backend.schema:
        data["schema"] = backend.schema
    data.update(extra)
    return SqlSourceConfig.model_validate(data)


def make_source(config: SqlSourceConfig, name: str = "sap-prd") -> SqlSource:
    """A source as the supervisor builds it."""
    return SqlSource(name, config, CONTEXT)


def outbox_records(box: Outbox) -> list[dict[str, Any]]:
    """Every record in the outbox, in append order, as envelopes (with ``seq``)."""
    con = sqlite3.connect(box.path)
    try:
        rows = con.execute("SELECT seq, body FROM records ORDER BY seq").fetchall()
    finally:
        con.close()
    return [{**orjson.loads(body), "seq": seq} for seq, body in rows]


def latest(box: Outbox, entity_type: str) -> dict[str, dict[str, Any]]:
    """The newest record per remote_id of one entity type."""
    out: dict[str, dict[str, Any]] = {}
    for rec in outbox_records(box):
        if rec["entity_type"] == entity_type:
            out[rec["remote_id"]] = rec
    return out
