"""Configuration of a ``[sources.<name>]`` table with ``type = "sql"``.

One class per TOML table; unknown keys are errors and the field docstrings are the user
documentation (docs/sql-sources.md repeats them with examples).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from agent.configtypes import (
    ByteSize,
    Duration,
    PositiveDuration,
    SecretFilePath,
    Section,
    at_least,
)
from agent.records import EntityType
from agent.rules.config import RuleConfig
from agent.sources.base import SourceConfig

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

Profile = Literal["sap_ecc", "maximo", "declarative"]
CursorKind = Literal["timestamp", "number", "text", "sap_date", "sap_datetime"]

PROFILE_ENTITIES: dict[str, tuple[str, ...]] = {
    "sap_ecc": ("assets", "locations", "work_orders", "notifications", "readings", "parts",
                "inventory", "purchase_orders"),
    "maximo": ("work_orders", "assets", "locations"),
}  # fmt: skip
"""Entities of the built-in profiles (``include`` picks from these)."""

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$#]*$")
# Statements that change data or the session; refused anywhere in a declarative query.
_WRITE_WORDS = re.compile(
    r"\b(insert|update|delete|merge|upsert|drop|alter|create|truncate|grant|revoke|call|"
    r"exec|execute|copy|lock|set|attach|detach|pragma|vacuum|into|for\s+update)\b",
    re.IGNORECASE,
)
_COMMENT = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)
_STRING = re.compile(r"'(?:[^']|'')*'")


def check_select(sql: str) -> str:
    """Accept one read-only SELECT (or WITH ... SELECT) statement, or raise ValueError.

    This is a guard against configuration mistakes, not a sandbox: the session is also
    read-only where the database allows it, and the account should only have SELECT.
    """
    bare = _STRING.sub("''", _COMMENT.sub(" ", sql)).strip().rstrip(";").strip()
    if ";" in bare:
        raise ValueError("only one statement is allowed (found ';')")
    first = bare.split(None, 1)[0].lower() if bare else ""
    if first not in {"select", "with"}:
        raise ValueError("the query must be a single SELECT statement")
    if m := _WRITE_WORDS.search(bare):
        raise ValueError(f"the query must only read; {m.group(0).upper()!r} is not allowed")
    return sql.strip().rstrip(";")


# The pip packages of each documented driver (docs/sql-sources.md, "Drivers").
DRIVER_PACKAGES: dict[str, str] = {
    "asyncpg": "asyncpg",
    "asyncmy": "asyncmy",
    "aioodbc": "aioodbc",
    "oracledb_async": "oracledb",
    "oracledb": "oracledb",
    "hdbcli": "hdbcli sqlalchemy-hana",
    "aiosqlite": "aiosqlite",
}


def check_driver(url: URL) -> None:
    """The URL's dialect exists and its driver imports, or ValueError saying what to
    install: the runtime would otherwise fail (and retry forever) at its first query."""
    from sqlalchemy.exc import NoSuchModuleError  # noqa: PLC0415 - keep config import light

    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise ValueError(
            f"unknown database dialect or driver {url.drivername!r} (write for example "
            "'postgresql+asyncpg://', 'mysql+asyncmy://', 'oracle+oracledb_async://', "
            "'sqlite+aiosqlite:///')"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        package = DRIVER_PACKAGES.get(url.get_driver_name(), exc.name or url.get_driver_name())
        raise ValueError(
            f"the database driver of {url.drivername!r} is not installed "
            f"(no module {exc.name!r}); add it to the agent's environment: "
            f"{Path(sys.prefix) / 'bin' / 'pip'} install {package} (docs/sql-sources.md, Drivers)"
        ) from None


def check_ident(name: str) -> str:
    """A plain SQL identifier (optionally schema-qualified with one dot)."""
    parts = name.split(".")
    if len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
        raise ValueError(f"{name!r} is not a plain identifier (letters, digits, _)")
    return name


class FieldMapping(Section):
    """Per-entity field mapping, applied after the profile's own mapping.

    Changes take effect on reload; no code change is needed.
    """

    rename: dict[str, str] = Field(default_factory=dict)
    """Rename unified ``data`` fields: ``{ title = "name" }``."""
    drop: list[str] = Field(default_factory=list)
    """Remove these ``data`` fields (and ``remote_data`` columns of the same name)."""
    custom: dict[str, str] = Field(default_factory=dict)
    """Add ``custom`` fields from raw source columns: ``{ zz_contract = "ZZCONTRACT" }``."""
    remote_data: bool = True
    """Include the raw row as ``remote_data``."""


CHANGE_DOCUMENT_ENTITIES = ("assets", "locations", "work_orders", "notifications")
"""``sap_ecc`` entities with SAP change documents (CDHDR object classes)."""


class ChildConfig(Section):
    """A child table of an entity: its rows change without the entity's own cursor
    moving (a text, a status history, task lines).

    Declarative: ``[sources.<name>.entities.<entity>.children.<child>]``; maximo:
    ``[sources.<name>.children.<entity>.<child>]``. With a ``cursor``, a changed child row
    re-reads the entities it belongs to on the next incremental sync (a feed of its own,
    with its own watermark). Without one, only reconciliation (``reconcile_interval``)
    sees its changes. A deleted child row moves no cursor: reconciliation sees that too.
    """

    table: str
    """The child table (or ``schema.table``)."""
    on: dict[str, str]
    """How a child row names its entity: child column = entity column,
    ``{ WONUM = "WONUM", SITEID = "SITEID" }``."""
    key: list[str] = Field(default_factory=list)
    """Columns identifying a child row (default: the ``on`` columns); they order rows
    that share a cursor value, so none is skipped at a chunk border."""
    cursor: str | None = None
    """Column whose value grows when the child row changes; unset: no feed, reconciliation
    covers the table."""
    cursor_kind: CursorKind = "timestamp"
    """Kind of ``cursor``, as for entities."""
    overlap: Duration = 0.0
    """Re-read this much before the child's watermark on every sync."""
    columns: list[str] = Field(default_factory=list)
    """Child columns added to the entity's row as ``<child>.<column>`` (for ``fields``,
    ``mappings.custom`` and ``remote_data``). Only for children with at most one row per
    entity row (a long description, a text): more would repeat the entity."""
    match: dict[str, str] = Field(default_factory=dict)
    """Child column = value that a child row must have: ``{ LDOWNERTABLE = "WORKORDER" }``."""

    @field_validator("table")
    @classmethod
    def _table(cls, value: str) -> str:
        return check_ident(value)

    @field_validator("on")
    @classmethod
    def _on(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("at least one column pair is required")
        for child, parent in value.items():
            check_ident(child)
            check_ident(parent)
        return value

    @field_validator("key", "columns")
    @classmethod
    def _idents(cls, value: list[str]) -> list[str]:
        return [check_ident(v) for v in value]

    @field_validator("match")
    @classmethod
    def _match(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            check_ident(name)
        return value

    @field_validator("cursor")
    @classmethod
    def _cursor(cls, value: str | None) -> str | None:
        return None if value is None else check_ident(value)


class EntityConfig(Section):
    """One declarative entity (``[sources.<name>.entities.<entity>]``)."""

    entity_type: EntityType
    """Unified entity type: ``work_order``, ``asset``, ``location``, ``part``..."""
    table: str | None = None
    """Table (or ``schema.table``) to read. Set ``table`` or ``query``, not both."""
    query: str | None = None
    """A single SELECT; refused at load if it is anything else."""
    key: list[str]
    """Columns that identify a row (``remote_id`` joins them with ``/``)."""
    cursor: str
    """Column whose value grows on every change (timestamp, rowversion, sequence)."""
    cursor_kind: CursorKind = "timestamp"
    """``timestamp`` (date/time column), ``number`` (rowversion, sequence), ``text``,
    ``sap_date`` (CHAR(8) YYYYMMDD) or ``sap_datetime`` (CHAR(14))."""
    overlap: Duration = 0.0
    """Re-read this much before the watermark on every sync (day-precision cursors: "1d");
    re-read unchanged rows are skipped by content hash."""
    fields: dict[str, str] = Field(default_factory=dict)
    """Unified ``data`` field = source column, e.g. ``{ title = "DESCRIPTION" }``."""
    deleted_when: dict[str, str] = Field(default_factory=dict)
    """Column = value that marks a row deleted (``op = delete``): ``{ IS_DELETED = "1" }``."""
    modified_precision: Literal["second", "minute", "day", "none"] = "second"
    """Precision of the cursor column, stamped on records."""
    children: dict[str, ChildConfig] = Field(default_factory=dict)
    """Child tables whose changes the entity's ``cursor`` does not see (see
    :class:`ChildConfig`)."""

    @field_validator("table")
    @classmethod
    def _table(cls, value: str | None) -> str | None:
        return None if value is None else check_ident(value)

    @field_validator("query")
    @classmethod
    def _query(cls, value: str | None) -> str | None:
        return None if value is None else check_select(value)

    @field_validator("key")
    @classmethod
    def _key(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one key column is required")
        return [check_ident(v) for v in value]

    @field_validator("cursor")
    @classmethod
    def _cursor(cls, value: str) -> str:
        return check_ident(value)

    @model_validator(mode="after")
    def _one_source(self) -> EntityConfig:
        if (self.table is None) == (self.query is None):
            raise ValueError("set exactly one of 'table' or 'query'")
        return self


class SqlSourceConfig(SourceConfig):
    """A database source: SAP ECC, IBM Maximo, or any CMMS declared in config."""

    type: Literal["sql"]
    """Always ``"sql"``."""
    profile: Profile
    """``sap_ecc``, ``maximo`` or ``declarative`` (tables and queries declared below)."""
    url: str
    """SQLAlchemy URL without password, e.g. ``postgresql+asyncpg://edge@db:5432/prd``,
    ``mysql+asyncmy://``, ``mssql+aioodbc://``, ``oracle+oracledb_async://``,
    ``hana+hdbcli://`` (run in a worker thread), ``sqlite+aiosqlite:///path?mode=ro``."""
    password: SecretStr | None = None
    """Database password (prefer ``password_file``); merged into the URL, never logged."""
    password_file: SecretFilePath | None = None
    """File holding the database password."""
    db_schema: str | None = Field(default=None, alias="schema")
    """Schema of the profile's tables (SAP: often ``SAPSR3``; Maximo: ``MAXIMO``)."""
    client: str = "100"
    """SAP client (``MANDT``): only rows of this client are read."""
    language: str = "E"
    """SAP language key (``SPRAS``) for texts (EQKT, IFLOTX, MAKT, TJ02T)."""
    timezone: str = "UTC"
    """Time zone of the database's local times (SAP server time), e.g. ``Europe/Berlin``."""
    entities: dict[str, EntityConfig] = Field(default_factory=dict)
    """Declarative profile: the entities to read (see docs/sql-sources.md)."""
    children: dict[str, dict[str, ChildConfig]] = Field(default_factory=dict)
    """Maximo profile: child tables per entity, ``[sources.<name>.children.work_orders.
    longdesc]`` (see :class:`ChildConfig`)."""
    change_documents: bool | list[str] = False
    """``sap_ecc``: also read SAP change documents (CDHDR) as a feed: ``true`` for every
    entity that has them (assets, locations, work_orders, notifications) or a list of
    them. Needs SELECT on CDHDR and, on a large CDHDR, an index on (MANDANT, OBJECTCLAS,
    UDATE); docs/sql-sources.md says what they catch and what a site must have."""
    include: list[str] | None = None
    """Built-in profiles: read only these entities (default: all of the profile)."""
    interval: PositiveDuration = 900.0
    """Time between incremental syncs of an entity (seconds to daily: "30s", "15m", "1d")."""
    initial_window: PositiveDuration | None = 90 * 86400.0
    """First sync reads rows changed within this window ("90d"); unset: everything."""
    reconcile_interval: PositiveDuration | None = 86400.0
    """Content reconciliation: within each interval every row is re-read (spread over the
    interval), compared with what the upstream holds, drifts sent; hard deletes become
    ``delete`` records. Unset: never (hard deletes are then never found)."""
    chunk_size: int = Field(default=5000, ge=1, le=100_000)
    """Rows per query and per outbox transaction; memory stays flat at any table size."""
    chunk_max_bytes: ByteSize = Field(default=8 << 20, ge=64 << 10)
    """Most bytes of row data (text and binary values) per query: a chunk has fewer rows
    than ``chunk_size`` when rows are wide (long texts, CLOBs, blobs). Each query's row
    count comes from the widest row of the previous chunk (the first query of a feed
    reads one row to learn it), so memory stays flat at any row width too, for tables
    whose rows do not suddenly grow wider than before; a single row is read whole."""
    mappings: dict[str, FieldMapping] = Field(default_factory=dict)
    """Field mappings per entity name: ``[sources.<name>.mappings.work_orders]``."""
    retry_initial: PositiveDuration = 5.0
    """First retry delay after a database error (full-jitter backoff)."""
    retry_cap: PositiveDuration = 600.0
    """Longest retry delay."""
    query_timeout: PositiveDuration = 300.0
    """A query taking longer than this fails (and is retried)."""

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use e.g. 'Europe/Berlin')") from None
        return value

    @field_validator("db_schema")
    @classmethod
    def _schema(cls, value: str | None) -> str | None:
        return None if value is None else check_ident(value)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url  # noqa: PLC0415 - keep config import light
        from sqlalchemy.exc import ArgumentError  # noqa: PLC0415

        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError(f"invalid database URL: {exc}") from None
        if url.password:
            raise ValueError("put the password in 'password_file', not in the URL")
        return value

    def problems(self) -> list[tuple[str, str]]:
        """Also: the URL's driver must be installed (a disabled source's is a warning)."""
        from sqlalchemy.engine import make_url  # noqa: PLC0415

        try:
            check_driver(make_url(self.url))
        except ValueError as exc:
            return [*super().problems(), ("url", str(exc))]
        return super().problems()

    def files(self) -> dict[str, Path]:
        """A SQLite database file must exist: the source opens it read-only."""
        from sqlalchemy.engine import make_url  # noqa: PLC0415

        url = make_url(self.url)
        db = url.database
        if url.get_backend_name() != "sqlite" or not db or db == ":memory:":
            return {}
        return {"url": Path(db.removeprefix("file:").split("?", 1)[0])}

    @field_validator("retry_cap")
    @classmethod
    def _check_retry(cls, value: float, info: ValidationInfo) -> float:
        return at_least(value, info, "retry_initial")

    @field_validator("rules")
    @classmethod
    def _no_rules(cls, value: list[RuleConfig]) -> list[RuleConfig]:
        # Rules watch points (``data.point``) of readings and events; SQL records have
        # none, so a rule here could never fire: say so instead of staying silent.
        if value:
            raise ValueError("edge rules watch MQTT and Modbus points; a sql source has none")
        return value

    @model_validator(mode="after")
    def _profile_entities(self) -> SqlSourceConfig:
        if self.profile == "declarative" and not self.entities:
            raise ValueError("profile 'declarative' needs at least one [entities.<name>] table")
        if self.profile != "declarative" and self.entities:
            raise ValueError(f"'entities' is for profile 'declarative', not {self.profile!r}")
        known = PROFILE_ENTITIES.get(self.profile) or tuple(self.entities)
        unknown = sorted(set(self.include or ()) - set(known))
        if unknown:
            raise ValueError(
                f"include: unknown entities {unknown}; {self.profile} has {list(known)}"
            )
        # A mapping of an entity that does not exist would be ignored without a word.
        stray = sorted(set(self.mappings) - set(known))
        if stray:
            raise ValueError(
                f"mappings: unknown entities {stray}; {self.profile} has {list(known)}"
            )
        self._check_change_documents()
        self._check_children(known)
        return self

    def _check_change_documents(self) -> None:
        wanted = self.change_documents
        if wanted is False or wanted == []:
            return
        if self.profile != "sap_ecc":
            raise ValueError(f"'change_documents' is for profile 'sap_ecc', not {self.profile!r}")
        if isinstance(wanted, list):
            unknown = sorted(set(wanted) - set(CHANGE_DOCUMENT_ENTITIES))
            if unknown:
                raise ValueError(
                    f"change_documents: no change documents for {unknown}; "
                    f"entities with them: {list(CHANGE_DOCUMENT_ENTITIES)}"
                )

    def _check_children(self, known: tuple[str, ...]) -> None:
        if self.children and self.profile == "declarative":
            raise ValueError("declarative entities declare theirs: entities.<entity>.children")
        if self.children and self.profile != "maximo":
            raise ValueError(f"'children' is for profile 'maximo', not {self.profile!r}")
        unknown = sorted(set(self.children) - set(known))
        if unknown:
            raise ValueError(f"children: unknown entities {unknown}; maximo has {list(known)}")
        if self.reconcile_interval is not None:
            return
        declared = [(f"children.{e}.{c}", ch) for e, cs in self.children.items()
                    for c, ch in cs.items()]  # fmt: skip
        declared += [(f"entities.{e}.children.{c}", ch) for e, ent in self.entities.items()
                     for c, ch in ent.children.items()]  # fmt: skip
        blind = [path for path, ch in declared if ch.cursor is None]
        if blind:
            raise ValueError(
                f"{', '.join(blind)}: no cursor and reconcile_interval is unset, so changes "
                "to that table would never be seen; set a cursor or reconcile_interval"
            )
