"""Database access for SQL sources: URL and password, read-only sessions, error classes.

Every query the sync issues is bounded (``LIMIT chunk``), so results are fetched whole and
memory stays flat whatever the table size. Drivers are optional extras: asyncpg
(PostgreSQL), asyncmy (MySQL/MariaDB), aioodbc (SQL Server), oracledb (Oracle, async mode),
aiosqlite (SQLite) and hdbcli (SAP HANA, which has no asyncio driver: its synchronous
engine runs in worker threads).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import structlog
from sqlalchemy import event
from sqlalchemy.engine import URL, CursorResult, Engine, make_url
from sqlalchemy.engine import cursor as sa_cursor
from sqlalchemy.exc import DBAPIError, NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.sql import Executable

from agent.configtypes import secret_value
from agent.errors import ConfigError, ReauthorizationRequired, TransientError
from agent.sources.sql.config import SqlSourceConfig

log = structlog.get_logger("agent.sources.sql")

Row = dict[str, Any]
_T = TypeVar("_T")

# Per dialect: the statement that makes the whole session read-only.
_READ_ONLY: dict[str, str] = {
    "postgresql": "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "mysql": "SET SESSION TRANSACTION READ ONLY",
    "mariadb": "SET SESSION TRANSACTION READ ONLY",
    "sqlite": "PRAGMA query_only = ON",
}

# Codes meaning "these credentials are refused" (not a passing failure).
_AUTH_SQLSTATES = {"28000", "28P01"}
_AUTH_CODES = {
    1044,  # MySQL/MariaDB: access denied to database
    1045,  # MySQL/MariaDB: access denied for user (wrong password)
    1698,  # MySQL: access denied (auth plugin)
    18456,  # SQL Server: login failed
    1017,  # Oracle ORA-01017 invalid username/password
    28000,  # Oracle ORA-28000 account locked
    10,  # SAP HANA: authentication failed
}
_AUTH_NAMES = ("InvalidPassword", "InvalidAuthorization", "AuthenticationFailed")


def build_url(config: SqlSourceConfig) -> URL:
    """The connection URL with the password from ``password``/``password_file`` merged in."""
    url = make_url(config.url)
    password = secret_value(config.password)
    if password is not None:
        url = url.set(password=password)
    return url


def masked(url: URL) -> str:
    """The URL as text with the password replaced by ``***`` (safe to log and show)."""
    return url.render_as_string(hide_password=True)


def is_auth_error(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) says the database refused the credentials."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if any(n in type(err).__name__ for n in _AUTH_NAMES):
            return True
        state = getattr(err, "sqlstate", None) or getattr(err, "pgcode", None)
        if isinstance(state, str) and state in _AUTH_SQLSTATES:
            return True
        args = getattr(err, "args", ())
        if args and isinstance(args[0], int) and args[0] in _AUTH_CODES:
            return True
        if "ORA-01017" in str(err):
            return True
        todo += [getattr(err, "orig", None), err.__cause__, err.__context__]
    return False


def classify(exc: BaseException) -> Exception:
    """Map a driver/SQLAlchemy error to the agent's error classes (one place only)."""
    if is_auth_error(exc):
        return ReauthorizationRequired(_short(exc), reason="credentials_rejected")
    return TransientError(_short(exc))


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _install_read_only(sync_engine: Engine, dialect: str) -> None:
    statement = _READ_ONLY.get(dialect)
    if statement is None:
        return  # SQL Server: ApplicationIntent=ReadOnly in the URL; Oracle/HANA: grants

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(statement)
        finally:
            cursor.close()
        # PostgreSQL's SET is transactional: without this commit the pool's rollback
        # would undo it.
        dbapi_connection.commit()


# SQLAlchemy's plain fetch strategy, looked up rather than imported: if a release moves
# it, _plain_rows falls back to result.all() instead of the module failing to import.
_PLAIN_FETCH: type | None = getattr(sa_cursor, "CursorFetchStrategy", None)


def _plain_rows(result: CursorResult[Any]) -> Sequence[Sequence[Any]]:
    """All rows of ``result``, straight from the driver when SQLAlchemy would not convert.

    Our queries select untyped or plain columns, so SQLAlchemy's rows only wrap the
    driver's tuples; building those wrappers cost a fifth of a fetch (22% of the client's
    instructions, asyncpg, 5,000-row chunks). The driver's rows are taken only when the
    result uses the plain fetch strategy (nothing buffered aside) and no column has a
    result processor; anything else (or a SQLAlchemy whose internals moved: the checks
    then fail) goes through ``result.all()``. The strategy's own ``fetchall`` is called,
    so a driver error while fetching is still wrapped (``DBAPIError``, then classified),
    a dropped connection is still invalidated, and the result is closed.
    """
    meta = getattr(result, "_metadata", None)
    strategy = getattr(result, "cursor_strategy", None)
    plain = _PLAIN_FETCH is not None and type(strategy) is _PLAIN_FETCH
    if plain and meta is not None and getattr(meta, "_effective_processors", 0) is None:
        return strategy.fetchall(result, result.cursor)  # type: ignore[no-any-return, union-attr]
    return result.all()


class Database:
    """One source database. ``await open()``, then bounded ``fetch`` calls, ``close()``."""

    def __init__(self, config: SqlSourceConfig) -> None:
        self.url = build_url(config)
        self.display_url = masked(self.url)
        self.timeout = config.query_timeout
        self.threaded = False
        self._async: AsyncEngine | None = None
        self._sync: Engine | None = None

    @property
    def dialect_name(self) -> str:
        """``postgresql``, ``mysql``, ``mssql``, ``oracle``, ``sqlite``, ``hana``..."""
        return self.url.get_backend_name()

    def open(self) -> None:
        """Create the engine (connections are made lazily, by the first query).

        No pool pre-ping: a query on a dead pooled connection fails, SQLAlchemy drops
        the connection, and the sync retries with backoff; a ping per chunk would cost a
        round trip for nothing in the common case.
        """
        try:
            # Drivers without asyncio support (SAP HANA's hdbcli, plain sqlite://) run
            # their synchronous engine in worker threads.
            self.threaded = not self.url.get_dialect().is_async
            if self.threaded:
                from sqlalchemy import create_engine  # noqa: PLC0415

                self._sync = create_engine(self.url)
                _install_read_only(self._sync, self.dialect_name)
            else:
                self._async = create_async_engine(self.url)
                _install_read_only(self._async.sync_engine, self.dialect_name)
        except (ImportError, NoSuchModuleError) as exc:
            name = getattr(exc, "name", None) or str(exc)
            raise ConfigError(
                [("url", f"database driver not installed ({name}); install its extra")]
            ) from None

    @property
    def dialect(self) -> Any:
        """The SQLAlchemy dialect (for compiling and quoting)."""
        engine: Any = self._sync if self._sync is not None else self._async
        if engine is None:
            raise RuntimeError("database is not open")
        return engine.dialect

    async def fetch(self, stmt: Executable, params: Mapping[str, Any] | None = None) -> list[Row]:
        """Run one bounded query; rows as dicts. Raises TransientError/ReauthorizationRequired."""
        return await self._run(stmt, params, _rows)

    async def columns(self, stmt: Executable) -> list[str]:
        """The column names of ``stmt``'s result (give it ``LIMIT 0``: no row is read).
        Raises TransientError/ReauthorizationRequired as :meth:`fetch` does."""
        return await self._run(stmt, None, _keys)

    async def _run(
        self,
        stmt: Executable,
        params: Mapping[str, Any] | None,
        shape: Callable[[CursorResult[Any]], _T],
    ) -> _T:
        """Execute ``stmt`` within ``query_timeout``; ``shape`` makes the answer of its
        result. Driver and connection errors are classified (one place for both uses)."""
        try:
            async with asyncio.timeout(self.timeout):
                if self._sync is not None:
                    return await asyncio.to_thread(self._run_sync, stmt, params, shape)
                assert self._async is not None
                async with self._async.connect() as conn:
                    return shape(await conn.execute(stmt, dict(params or {})))
        except TimeoutError:
            raise TransientError(f"query timed out after {self.timeout:.0f}s") from None
        except (DBAPIError, OSError, ConnectionError) as exc:
            raise classify(exc) from exc
        except Exception as exc:
            # Drivers raise their own classes on connect (asyncpg), before SQLAlchemy wraps.
            if type(exc).__module__.split(".")[0] in {"asyncpg", "asyncmy", "aiosqlite"}:
                raise classify(exc) from exc
            raise

    def _run_sync(
        self,
        stmt: Executable,
        params: Mapping[str, Any] | None,
        shape: Callable[[CursorResult[Any]], _T],
    ) -> _T:
        assert self._sync is not None
        with self._sync.connect() as conn:
            return shape(conn.execute(stmt, dict(params or {})))

    async def close(self) -> None:
        """Close every pooled connection."""
        if self._async is not None:
            with contextlib.suppress(Exception):
                await self._async.dispose()
        if self._sync is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._sync.dispose)
        self._async = self._sync = None


def _rows(result: CursorResult[Any]) -> list[Row]:
    keys = list(result.keys())
    return [dict(zip(keys, r)) for r in _plain_rows(result)]  # noqa: B905


def _keys(result: CursorResult[Any]) -> list[str]:
    return list(result.keys())


def first_value(rows: Sequence[Row]) -> Any:
    """The first column of the first row (or None)."""
    return next(iter(rows[0].values())) if rows else None
