"""The durable SQLite outbox: where every record waits until the upstream has it.

Guarantees (see also README "The outbox"):

* :meth:`Outbox.append` returns only after the records, and the source's cursor if given,
  are committed in ONE SQLite transaction with ``synchronous=FULL`` in WAL mode: once it
  returns, a crash or power cut cannot lose them. Concurrent appends are group-committed
  by a single writer task, so many producers share one fsync.
* Nothing deletes a record except :meth:`ack` (the upstream accepted it), :meth:`reject`
  (moved to the dead-letter table, with its reason, replayable) and retention, which only
  ever drops ``meter_reading``/``event`` records, only when configured, and counts every
  drop by reason in a persisted counter.
* Over its byte budget the outbox applies backpressure: ``append`` waits (business records
  always; readings too unless ``when_full = "drop_oldest"``).
* :meth:`lease` hands out records in append order and never hands out a later record of an
  entity while an earlier one is in flight, so per-entity order holds at any forwarder
  concurrency.
* Entity versions (everything but readings and events) get their chained id here, in the
  write transaction: ``chain_id(entity_id, content_hash, prev)`` with ``prev`` the id of
  the entity's last version appended to this file, or the file's :attr:`Outbox.epoch`
  (a random uuid made with the file) for its first. A version equal to the entity's last
  one is not appended (counted as ``unchanged``). The stored body carries the chained
  id, so a redelivery sends the same id, and a fresh file never repeats an old one.

Concurrency model: one aiosqlite connection writes (guarded by a lock, so a transaction's
statements never interleave with another's), a second one reads (it sees committed data
only, so a lease never hands out rows a failing transaction is about to roll back).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import time
import uuid
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import aiosqlite
import orjson
import structlog
from pydantic import Field

from agent import outbox_keys
from agent import records as records_module
from agent.configtypes import ByteSize, PositiveDuration, Section
from agent.errors import OutboxWriteError
from agent.health import DISK_LOW, Component, Kind, State, Tracker
from agent.horizon import Flow
from agent.outbox_disk import DiskReserve, DiskState, DiskWatch, parse_reserve
from agent.records import (
    EntityType,
    Record,
    RetentionClass,
    chainable,
    retention_class,
)

log = structlog.get_logger("agent.outbox")

SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL,
    entity_id   TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    class       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    size        INTEGER NOT NULL,
    body        BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_readings ON records(seq) WHERE class = 'reading';
CREATE TABLE IF NOT EXISTS dead_letters (
    seq         INTEGER PRIMARY KEY,
    id          TEXT NOT NULL,
    entity_id   TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    class       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    size        INTEGER NOT NULL,
    body        BLOB NOT NULL,
    reason      TEXT NOT NULL,
    rejected_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    qid         INTEGER PRIMARY KEY AUTOINCREMENT,
    source      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    context     TEXT NOT NULL,
    payload     BLOB,
    at          REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (
    source      TEXT NOT NULL,
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (source, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entity_versions (
    entity  TEXT PRIMARY KEY,
    digest  TEXT NOT NULL,
    last_id TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals (
    class TEXT PRIMARY KEY,
    rows  INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO totals VALUES ('business', 0, 0), ('reading', 0, 0);
""" + outbox_keys.SCHEMA

# Inserts a whole group in ONE statement: the rows' columns as a JSON array (?1) and
# their bodies concatenated in one blob (?2), cut back apart with substr(). executemany
# would step once per row, and the sqlite3 module releases and re-takes the GIL around
# every step: with the event loop busy mapping the next chunk, each re-take waited up to
# the interpreter's switch interval (5 ms), and writer and loop ran one at a time.
_INSERT_MANY = (
    "INSERT INTO records (id, entity_id, entity_type, class, created_at, size, body) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
    "json_extract(value, '$[2]'), json_extract(value, '$[3]'), json_extract(value, '$[4]'), "
    "json_extract(value, '$[5]'), substr(?2, json_extract(value, '$[6]'), "
    "json_extract(value, '$[5]')) FROM json_each(?1) ORDER BY key"
)
_INSERT_MANY_BYTES = 16 << 20
"""Body bytes per statement (SQLite's default string limit is 1 GB; keep far below)."""
_ADD_TOTAL = "UPDATE totals SET rows = rows + ?, bytes = bytes + ? WHERE class = ?"
_BUMP = (
    "INSERT INTO counters (name, value) VALUES (?, ?) "
    "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value"
)
_CLASSES = (RetentionClass.BUSINESS.value, RetentionClass.READING.value)
_BUSINESS = RetentionClass.BUSINESS.value
# entity_versions of a group: read and written with one statement each (see _INSERT_MANY)
_VERSIONS_OF = (
    "SELECT entity, digest, last_id FROM entity_versions "
    "WHERE entity IN (SELECT value FROM json_each(?))"
)
# ?1: the entities (a JSON array), ?2: their digests and ids, 32 + 36 bytes each, in one
# blob (substr of a blob is by byte, O(1); three json_extract per row cost twice as much)
_SET_VERSIONS = (
    "INSERT INTO entity_versions (entity, digest, last_id) "
    "SELECT value, CAST(substr(?2, key * 68 + 1, 32) AS TEXT), "
    "CAST(substr(?2, key * 68 + 33, 36) AS TEXT) FROM json_each(?1) WHERE true "
    "ON CONFLICT(entity) DO UPDATE SET digest = excluded.digest, last_id = excluded.last_id"
)
_DISK_FRESH = 0.02
"""Seconds an append trusts the last look at the disk (a statvfs costs ~10 us; 50
producers appending single records would otherwise pay one each)."""
_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA busy_timeout=10000",
)


class _Tx:
    """One write transaction on the writer thread, and its row/byte changes per class."""

    __slots__ = ("added", "con", "delta")

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con
        self.delta: dict[str, list[int]] = {}
        self.added: dict[str, list[int]] = {}
        """Rows and bytes appended per class (the ingest the buffer horizon measures)."""

    def count(self, cls: str, rows: int, size: int) -> None:
        """Record a change of the ``totals`` of ``cls``."""
        d = self.delta.setdefault(cls, [0, 0])
        d[0] += rows
        d[1] += size


class OutboxConfig(Section):
    """The durable outbox (``[outbox]``): where records wait until the upstream has them."""

    path: Path | None = None
    """Database file. Default: ``<agent.state_dir>/outbox.db``."""
    max_bytes: ByteSize = 1 << 30
    """Byte budget for undelivered records (record bytes, not file size). Default 1GiB."""
    when_full: Literal["block", "drop_oldest"] = "block"
    """Over budget: ``block`` pauses every source (nothing is dropped);
    ``drop_oldest`` drops the oldest meter readings and events instead (counted).
    Business records (work orders, assets, ...) always block, never drop."""
    readings_max_age: PositiveDuration | None = None
    """Drop meter readings and events older than this (counted). Business records have no
    maximum age by design."""
    integrity_check: Literal["quick", "full", "off"] = "quick"
    """Check at start-up; a corrupt database is moved aside and a fresh one started."""
    quarantine_max_rows: int = Field(default=10_000, ge=0)
    """Bad inputs kept for inspection; the oldest are evicted beyond this (counted)."""
    disk_reserve: DiskReserve = "auto"
    """Free disk space kept for deletes, checkpoints and the WAL: while less is free on
    the outbox's filesystem, appends wait (sources pause) and resume by themselves when
    space returns. ``"auto"``: 1% of the filesystem, at least 16MiB, at most a quarter
    of it; or a size (``"64MiB"``), a share (``"5%"``), or ``0`` (off)."""


@dataclass(frozen=True, slots=True)
class Cursor:
    """A source's position, committed in the same transaction as its records."""

    source: str
    key: str
    value: Any


@dataclass(frozen=True, slots=True)
class KeyMarks(Cursor):
    """Changes to a source's key set (agent.outbox_keys), committed like a cursor.

    Passed among an append's cursors, so every wrapper of the outbox carries it unchanged;
    the writer applies it to ``source_keys`` instead of the ``cursors`` table, in the
    same transaction as the records it describes. ``key`` names the scope (a SQL
    source's entity); ``value`` is unused.
    """

    entity_type: str = ""
    """The unified type of the scope's records (matches dead letters to keys)."""
    mark: int = 0
    """Stamped on every key written here (the reconciliation pass that saw it)."""
    versions: Sequence[tuple[str, bool, int | None, bytes | None]] = ()
    """``(key, live, digest, fields)`` of versions appended, in order (the last wins)."""
    sent: bool = False
    """The versions were stored for sure (appended without ``dedupe``): a dead-letter
    flag of the key is cleared even when the digest did not change."""
    seen: Sequence[str] = ()
    """Keys found unchanged: only their mark moves."""
    forget: Sequence[str] = ()
    """Keys gone from the source (their ``delete`` is in this append)."""
    seed: Sequence[str] = ()
    """Keys known live from an older agent's key list, digest unknown (upgrade)."""
    resend: Sequence[str] = ()
    """Keys whose version in this append equals the last one appended and is to be
    stored anyway (the upstream refused that one): their dedupe state is released
    before the append's versions are linked, so they chain on as a new version."""
    layout: tuple[int, Sequence[str]] | None = None
    """``(tag, field names)`` of the per-field digests in ``versions``."""


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A bad input kept for inspection instead of being delivered."""

    source: str
    reason: str
    context: dict[str, Any]
    payload: bytes | None = None


@dataclass(frozen=True, slots=True)
class Leased:
    """A record handed to the forwarder; ``body`` is its JSON envelope including ``seq``."""

    seq: int
    id: str
    entity_id: str
    entity_type: str
    retention: str
    size: int
    body: bytes


@dataclass(slots=True)
class AppendResult:
    """What an append did: records stored, skipped as unchanged, dropped for budget."""

    stored: int = 0
    unchanged: int = 0
    dropped: int = 0
    ids: list[str | None] = field(default_factory=list)
    """Per record appended, in order: the id it was stored under (an entity version's
    chained id), or None when it was not stored (unchanged, or dropped for budget)."""


@dataclass(slots=True)
class OutboxStats:
    """Figures for status and metrics."""

    rows: dict[str, int]
    bytes: dict[str, int]
    max_bytes: int
    oldest_age_seconds: float | None
    dead_letters: int
    quarantined: int
    counters: dict[str, int]
    leased: int
    blocked_appends: int
    write_errors: int
    last_write_error: str | None
    recovered_from: str | None
    epoch: str | None = None
    """This outbox file's epoch (made with the file; a fresh file gets a new one)."""
    write_failing: bool = False
    """The latest commit failed (disk full, I/O error); cleared by the next good one."""
    disk: DiskState | None = None
    """Free space on the outbox's filesystem and the reserve (None: reserve off)."""
    disk_blocked_appends: int = 0
    """Appends waiting because the disk is below the reserve."""
    oldest_reading_age_seconds: float | None = None
    """Age of the oldest undelivered meter reading or event (``readings_max_age``)."""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "rows": self.rows,
            "bytes": self.bytes,
            "total_rows": sum(self.rows.values()),
            "total_bytes": sum(self.bytes.values()),
            "max_bytes": self.max_bytes,
            "oldest_age_seconds": self.oldest_age_seconds,
            "oldest_reading_age_seconds": self.oldest_reading_age_seconds,
            "dead_letters": self.dead_letters,
            "quarantined": self.quarantined,
            "dropped": {
                k.removeprefix("dropped:"): v
                for k, v in self.counters.items()
                if k.startswith("dropped:")
            },
            "counters": self.counters,
            "leased": self.leased,
            "blocked_appends": self.blocked_appends,
            "write_errors": self.write_errors,
            "last_write_error": self.last_write_error,
            "write_failing": self.write_failing,
            "recovered_from": self.recovered_from,
            "epoch": self.epoch,
            "disk": None
            if self.disk is None
            else {**self.disk.as_dict(), "blocked_appends": self.disk_blocked_appends},
        }


# A row as inserted: (id, entity_id, entity_type, class, created_at, size, body, id_at);
# id_at >= 0: the id is written into body there as the row is inserted (a chained id).
_Row = tuple[str, str, str, str, float, int, bytes, int]


@dataclass(slots=True)
class _Pending:
    rows: list[_Row]
    # per row until _link filters rows: (entity, digest, content_hash) of an entity
    # version, None for a reading (the records themselves are not kept: their data
    # would stay alive until the commit)
    versions: list[tuple[str, str, str] | None]
    cursors: list[Cursor]
    quarantine: list[Quarantined]
    future: asyncio.Future[AppendResult]
    reserved: int = 0
    result: AppendResult = field(default_factory=AppendResult)


# entity type -> (its text, its retention class): enum attribute access costs, per record
_TYPE_AND_CLASS = {t: (t.value, retention_class(t).value) for t in EntityType}


def _row(record: Record, now: float) -> _Row:
    etype, cls = _TYPE_AND_CLASS.get(record.entity_type) or (
        record.entity_type.value,
        record.retention.value,
    )
    if cls == _BUSINESS:  # chained in the writer: the provisional id, and where it is
        rid, body, at = chainable(record)
        return (rid, record.entity_id, etype, cls, now, len(body), body, at)
    body = record.to_json()
    return (record.id, record.entity_id, etype, cls, now, len(body), body, -1)


def _insert_records(con: sqlite3.Connection, rows: Sequence[_Row]) -> dict[str, list[int]]:
    """Insert ``rows`` in order, a statement per ~16 MiB of bodies (see ``_INSERT_MANY``).

    Chained ids are written into the bodies here, in the one buffer of the statement.
    Returns the rows and bytes inserted per retention class.
    """
    added: dict[str, list[int]] = {}
    start = 0
    while start < len(rows):
        meta: list[tuple[str, str, str, str, float, int, int]] = []
        bodies: list[bytes] = []
        patches: list[tuple[int, str]] = []
        offset = 1  # substr() counts from 1
        for rid, eid, etype, cls, created, size, body, id_at in rows[start:]:
            if bodies and offset - 1 + size > _INSERT_MANY_BYTES:
                break
            meta.append((rid, eid, etype, cls, created, size, offset))
            bodies.append(body)
            if id_at >= 0:
                patches.append((offset - 1 + id_at, rid))
            offset += size
        blob = bytearray().join(bodies)
        for at, rid in patches:
            blob[at : at + 36] = rid.encode()
        con.execute(_INSERT_MANY, (orjson.dumps(meta).decode(), blob))
        start += len(meta)
    for row in rows:
        count = added.get(row[3])
        if count is None:
            count = added[row[3]] = [0, 0]
        count[0] += 1
        count[1] += row[5]
    return added


def _version(record: Record, etype: str) -> tuple[str, str, str]:
    """``(entity, digest, content_hash)``: ``entity_versions``' key and value for ``record``
    (of entity type ``etype``, as text: formatting the enum member costs twice as much).

    The entity is the name its ``entity_id`` is derived from (``source:type:remote_id``),
    not the uuid: sources read rows in about key order, and SAP keys are zero-padded, so
    consecutive versions land on neighbouring B-tree pages. Keyed by the random uuid,
    every append of a chunk rewrote pages all over the table: at 1M entities 73 us per
    record against 23 (see docs/outbox.md). The digest is the first 128 bits of the
    content hash, in hex (a collision would have to hit the same entity); always 32
    characters, as ``_SET_VERSIONS`` wants (a hash of another form is hashed).
    """
    chash = record.content_hash
    if chash.startswith("sha256:") and len(chash) == 71:
        digest = chash[7:39]
    else:  # a record not made by Record.entity
        digest = hashlib.sha256(chash.encode()).hexdigest()[:32]
    return f"{record.source.name}:{etype}:{record.remote_id}", digest, chash


def _json_list(values: Iterable[Any]) -> str:
    return orjson.dumps(list(values)).decode()


class Outbox:
    """The durable outbox. ``await open()`` before use, ``await close()`` after."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_bytes: int = 1 << 30,
        when_full: Literal["block", "drop_oldest"] = "block",
        readings_max_age: float | None = None,
        integrity_check: Literal["quick", "full", "off"] = "quick",
        quarantine_max_rows: int = 10_000,
        max_group_rows: int = 500,
        disk_reserve: str | int = "auto",
        disk_check_interval: float = 0.5,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.when_full = when_full
        self.readings_max_age = readings_max_age
        self.integrity_check = integrity_check
        self.quarantine_max_rows = quarantine_max_rows
        self.max_group_rows = max_group_rows
        self.disk_reserve = parse_reserve(disk_reserve)
        self.disk_check_interval = disk_check_interval
        self._disk: DiskWatch | None = None
        self._disk_blocked = 0
        self._disk_task: asyncio.Task[None] | None = None
        self._wal_limit = 0
        # Writes: one stdlib connection on one dedicated thread, a whole transaction per
        # hop. (aiosqlite costs an event-loop round trip per statement; at group-commit
        # rates that halved throughput.) Reads: aiosqlite, a second connection.
        self._executor: ThreadPoolExecutor | None = None
        self._wcon: sqlite3.Connection | None = None
        self._r: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._rows = dict.fromkeys(_CLASSES, 0)
        self._bytes = dict.fromkeys(_CLASSES, 0)
        self._reserved = 0
        self._leased: dict[int, Leased] = {}
        # The seqs handed out by leases, added ON THE WRITER THREAD as the lease query picks
        # them: a drop decided in a later transaction on that thread always sees them. (A
        # snapshot of _leased taken on the event loop could miss a lease whose query had
        # run but whose result had not reached the loop yet, and drop a record in flight.)
        self._lease_guard: set[int] = set()
        self._lease_lock = asyncio.Lock()
        self._scopes = outbox_keys.ScopeCache()  # key-set scope ids (writer thread)
        self._space = asyncio.Event()
        self._data = asyncio.Event()
        self._blocked = 0
        self._write_errors = 0
        self._last_write_error: str | None = None
        self._write_failing = False
        self._tracker = Tracker(State.OK)
        self.flow = Flow()
        """Ingest and delivery per minute, the last hour (the buffer horizon's rates)."""
        self.recovered_from: str | None = None
        self.epoch = ""
        """The file's epoch: the ``prev`` of every entity's first version (see module doc)."""

    @classmethod
    def from_config(cls, config: OutboxConfig, state_dir: Path) -> Outbox:
        """Build an outbox from its config section."""
        return cls(
            config.path or state_dir / "outbox.db",
            max_bytes=config.max_bytes,
            when_full=config.when_full,
            readings_max_age=config.readings_max_age,
            integrity_check=config.integrity_check,
            quarantine_max_rows=config.quarantine_max_rows,
            disk_reserve=config.disk_reserve,
        )

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Open (creating if needed), check integrity, and start the writer."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self._prepare_file)
        watch = DiskWatch(self.path.parent, self.disk_reserve, Path(f"{self.path}-wal"))
        self._disk = watch if watch.state.reserve_bytes > 0 else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="outbox-writer")
        loop = asyncio.get_running_loop()
        self._wcon = await loop.run_in_executor(self._executor, self._connect_writer)
        self._r = await self._connect()
        await self._refresh_totals()
        self._writer = asyncio.create_task(self._write_loop(), name="outbox-writer")
        if self._disk is not None:
            self._disk_task = asyncio.create_task(self._watch_disk(), name="outbox-disk")
        self._data.set()

    def _connect_writer(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, isolation_level=None)
        for pragma in _PRAGMAS:
            con.execute(pragma)
        # Debian's SQLite overwrites deleted content (SQLITE_SECURE_DELETE): an ack then
        # writes every page of the records it deletes to the WAL again, 445 KB for 200
        # records of 2 KB against 33 KB without. On a nearly full disk that decides
        # whether an ack fits; the freed pages hold delivered records of a file that
        # holds the undelivered ones anyway (mode 0600 in the state directory).
        con.execute("PRAGMA secure_delete=OFF")
        if self._disk is not None:
            # The WAL must fit the reserve: checkpoint it (SQLite's default: every 1000
            # pages, 4 MiB) and trim it back after a checkpoint at a quarter of the
            # reserve, so a disk of a few MiB never holds a WAL that can no longer be
            # copied into the database file. At the default reserve (16 MiB or more)
            # this is SQLite's default cadence.
            page = int(con.execute("PRAGMA page_size").fetchone()[0])
            pages = max(16, min(1000, self._disk.state.reserve_bytes // 4 // page))
            self._wal_limit = pages * page
            self._disk.floor = self._wal_limit
            con.execute(f"PRAGMA wal_autocheckpoint={pages}")
            con.execute(f"PRAGMA journal_size_limit={self._wal_limit}")
            self._disk.reusable = self._free_pages(con)
            self._disk.sample()
        return con

    @staticmethod
    def _free_pages(con: sqlite3.Connection) -> int:
        """Bytes of free pages inside the file (new records reuse them)."""
        count = int(con.execute("PRAGMA freelist_count").fetchone()[0])
        return count * int(con.execute("PRAGMA page_size").fetchone()[0])

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        for pragma in _PRAGMAS:
            await db.execute(pragma)
        return db

    def _prepare_file(self) -> None:
        """Integrity check and schema, in a worker thread (runs once at start-up)."""
        try:
            self.epoch = self._check_and_migrate()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
                raise
            self._move_aside(str(exc))
            self.epoch = self._check_and_migrate()

    def _check_and_migrate(self) -> str:
        """Check, then create or upgrade the schema in ONE transaction; returns the epoch."""
        con = sqlite3.connect(self.path, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            if self.integrity_check != "off":
                pragma = "quick_check" if self.integrity_check == "quick" else "integrity_check"
                result = [r[0] for r in con.execute(f"PRAGMA {pragma}(20)")]
                if result != ["ok"]:
                    raise sqlite3.DatabaseError("integrity check failed: " + "; ".join(result))
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"outbox {self.path} has schema version {version}, newer than this "
                    f"agent's {SCHEMA_VERSION}; upgrade the agent or move the file"
                )
            try:
                with con:
                    con.execute("BEGIN IMMEDIATE")
                    self._migrate(con, version)
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            con.execute(statement)
                    # A file without an epoch is new (or older than v3): it gets one, kept
                    # for its life. Nothing in it was chained yet, so no id can repeat.
                    con.execute(
                        "INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?), "
                        "('epoch_created_at', ?)",
                        (str(uuid.uuid4()), datetime.now(UTC).isoformat()),
                    )
                    con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            except sqlite3.Error as exc:
                # Not corruption (the check passed): moving the file aside would leave its
                # records behind. The transaction rolled back; the file is as it was.
                raise RuntimeError(
                    f"outbox {self.path}: creating or upgrading its schema (version "
                    f"{version} to {SCHEMA_VERSION}) failed, nothing was changed: {exc}"
                ) from exc
            return str(con.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0])
        finally:
            con.close()

    @staticmethod
    def _migrate(con: sqlite3.Connection, version: int) -> None:
        """Upgrade a file of schema ``version`` (inside the schema transaction).

        Records, dead letters, cursors and counters are never touched: queued records
        keep their ids and bodies (docs/outbox.md, "Schema versions").
        """
        if 0 < version < 2:
            # v1 kept the last hash per entity_id (a random uuid); v2 keys it by
            # entity name. Uuids cannot be turned back into names, so the old
            # table goes: the next overlap read or full re-sync may send an
            # unchanged version once more.
            con.execute("DROP TABLE IF EXISTS entity_hashes")
        if version == 2:
            # v3 chains ids: each entity's row gains its last version's id. v2 rows keep
            # their digest (dedupe goes on as before) with no id: the entity's next
            # version chains from the new epoch, an id no v2 agent ever made.
            con.execute("ALTER TABLE entity_versions ADD COLUMN last_id TEXT")

    def _move_aside(self, reason: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                src.rename(str(target) + suffix)
        self.recovered_from = f"{target} ({reason})"
        log.error(
            "outbox_corrupt_moved_aside",
            path=str(self.path),
            moved_to=str(target),
            error=reason,
            hint="the agent starts with a fresh outbox; keep the moved file for analysis",
        )

    async def close(self) -> None:
        """Stop the writer once everything queued is committed, then close."""
        if self._disk_task is not None:
            self._disk_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._disk_task
            self._disk_task = None
        if self._writer is not None:
            await self._queue.join()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        if self._r is not None:
            await self._r.close()
            self._r = None
        if self._executor is not None:
            con, self._wcon = self._wcon, None
            if con is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, con.close)
            self._executor.shutdown(wait=True)
            self._executor = None

    async def __aenter__(self) -> Outbox:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _rdb(self) -> aiosqlite.Connection:
        if self._r is None:
            raise RuntimeError("outbox is not open")
        return self._r

    # ------------------------------------------------------------------ append

    async def append(
        self,
        records: Sequence[Record],
        cursor: Cursor | Sequence[Cursor] | None = None,
        *,
        dedupe: bool = False,
        quarantine: Sequence[Quarantined] = (),
    ) -> AppendResult:
        """Commit ``records`` (and ``cursor``, and ``quarantine`` entries) durably.

        ``cursor`` may be one cursor or several (a source's and the rules engine's, for
        example); all of them commit in the same transaction as the records. A
        :class:`KeyMarks` among them changes the source's key set instead.

        Returns after the transaction holding all of them has committed; only then may the
        caller acknowledge its input. Waits while the outbox is over budget (that wait is
        the backpressure). An entity version whose ``content_hash`` equals the last one
        appended for that entity is skipped (counted as ``unchanged``); the others are
        stored under their chained ids, which the result lists (``AppendResult.ids``).
        ``dedupe`` is accepted for compatibility and ignored: since schema 3 every entity
        version is deduplicated, because with chained ids an unchanged re-read would
        otherwise become a new version upstream.

        Raises :class:`OutboxWriteError` when the commit failed (disk full, I/O error):
        nothing of this call was stored, and the caller must not acknowledge.
        """
        if self._writer is None:
            raise RuntimeError("outbox is not open")
        now = time.time()
        rows = [_row(r, now) for r in records]
        versions = [_version(r, row[2]) if row[3] == _BUSINESS else None for r, row in zip(
            records, rows, strict=True)]  # fmt: skip
        size = sum([r[5] for r in rows])
        if self.when_full == "drop_oldest":  # readings can make room: admit the rest only
            await self._admit(sum([r[5] for r in rows if r[3] == "business"]))
        else:
            await self._admit(size)
        loop = asyncio.get_running_loop()
        item = _Pending(
            rows=rows,
            versions=versions,
            cursors=[] if cursor is None else [cursor] if isinstance(cursor, Cursor) else [*cursor],
            quarantine=list(quarantine),
            future=loop.create_future(),
            reserved=size,
        )
        self._reserved += size
        self._queue.put_nowait(item)
        return await asyncio.shield(item.future)

    async def quarantine(self, entries: Sequence[Quarantined]) -> None:
        """Durably keep bad inputs with their reasons (counted per source and reason)."""
        await self.append((), quarantine=entries)

    async def _admit(self, size: int) -> None:
        """Wait until ``size`` more bytes (that cannot be dropped) fit the budget, and
        the disk has room for them above its reserve (agent.outbox_disk)."""
        blocked = disk_blocked = False
        try:
            while True:
                used = sum(self._bytes.values()) + self._reserved
                droppable = self._bytes["reading"] if self.when_full == "drop_oldest" else 0
                fits = size == 0 or used - droppable + size <= self.max_bytes or used == 0
                room = self._disk_room(size)
                if fits and room:
                    return
                if not fits and not blocked:
                    blocked = True
                    self._blocked += 1
                    self._judge()
                    log.warning(
                        "outbox_full_backpressure",
                        used_bytes=used,
                        max_bytes=self.max_bytes,
                        waiting_bytes=size,
                    )
                if not room and not disk_blocked:
                    disk_blocked = True
                    self._disk_blocked += 1
                self._space.clear()
                await self._space.wait()
        finally:
            if blocked:
                self._blocked -= 1
                self._judge()
            if disk_blocked:
                self._disk_blocked -= 1

    def _disk_room(self, size: int) -> bool:
        """Whether the disk has room for ``size`` more bytes above its reserve, by a look
        at most ``_DISK_FRESH`` old (something else may be filling the disk; every
        commit looks too)."""
        watch = self._disk
        if watch is None:
            return True
        if time.monotonic() - watch.sampled_at > _DISK_FRESH:
            self._sample_disk()
        return watch.admits(size, self._reserved)

    def _freed(self) -> None:
        self._sample_disk()
        self._space.set()

    def _sample_disk(self) -> DiskState | None:
        """Look at the disk (one statvfs); log when it turns low or fine again."""
        if self._disk is None:
            return None
        was = self._disk.state.low
        try:
            state = self._disk.sample()
        except OSError as exc:  # the directory went away: say so, keep the last view
            log.warning("outbox_disk_check_failed", error=str(exc))
            return self._disk.state
        if state.low and not was:
            log.warning(
                "outbox_disk_low_backpressure",
                free_bytes=state.free_bytes,
                reusable_bytes=state.reusable_bytes,
                reserve_bytes=state.reserve_bytes,
                hint="appends wait (sources pause) until space returns",
            )
        elif was and not state.low:
            log.info(
                "outbox_disk_ok",
                free_bytes=state.free_bytes,
                reusable_bytes=state.reusable_bytes,
                reserve_bytes=state.reserve_bytes,
            )
        return state

    async def _watch_disk(self) -> None:
        """Look at the disk every ``disk_check_interval``: wake waiting appends when space
        returned (nobody else would: nothing commits while they wait), and while it is
        low, checkpoint and count the pages deliveries freed inside the file."""
        while True:
            await asyncio.sleep(self.disk_check_interval)
            state = self._sample_disk()
            if state is None:
                return
            if state.low:
                await self._relieve()
                state = self._sample_disk()
            if state is not None and not state.low:
                self._space.set()

    async def _relieve(self) -> None:
        """On the writer thread: checkpoint the WAL into the file (truncating it when it
        grew beyond its limit, which returns that space) and read the free page count."""
        loop = asyncio.get_running_loop()
        try:
            freed = await loop.run_in_executor(self._executor, self._relieve_sync)
        except sqlite3.Error as exc:  # the disk may be too full even for this: next time
            log.warning("outbox_disk_checkpoint_failed", error=str(exc))
            return
        if self._disk is not None:
            self._disk.reusable = freed

    def _relieve_sync(self) -> int:
        con = self._wcon
        assert con is not None
        wal = Path(str(self.path) + "-wal")
        with contextlib.suppress(OSError):
            mode = "TRUNCATE" if wal.stat().st_size > self._wal_limit else "PASSIVE"
            con.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
        return self._free_pages(con)

    async def _write_loop(self) -> None:
        while True:
            first = await self._queue.get()
            group = [first]
            rows = len(first.rows)
            while rows < self.max_group_rows and not self._queue.empty():
                nxt = self._queue.get_nowait()
                group.append(nxt)
                rows += len(nxt.rows)
            try:
                await self._transaction(self._write_group, group, self._lease_guard)
            except Exception as exc:  # every waiter learns; the loop goes on
                self._write_errors += 1
                self._last_write_error = f"{type(exc).__name__}: {exc}"
                self._write_failing = True
                self._judge()
                log.error("outbox_write_failed", error=self._last_write_error, items=len(group))
                err = OutboxWriteError(f"outbox commit failed: {exc}")
                for item in group:
                    if not item.future.done():
                        item.future.set_exception(err)
                        # The caller may have gone away (cancelled); don't warn about it.
                        item.future.exception()
            else:
                if self._write_failing:
                    self._write_failing = False
                    self._judge()
                    log.info("outbox_write_recovered", write_errors=self._write_errors)
                self._data.set()
                for item in group:
                    if not item.future.done():
                        item.future.set_result(item.result)
            finally:
                for item in group:
                    self._reserved -= item.reserved
                    self._queue.task_done()
                if self._disk is not None:
                    self._disk.used(sum(item.reserved for item in group))
                self._freed()

    # Everything below that takes a `_Tx` runs on the writer thread, inside one transaction.

    async def _transaction(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(tx, *args)`` as ONE transaction on the writer thread (one hop).

        Changes of rows and bytes per class that ``fn`` reports through ``tx.count`` are
        written to the ``totals`` table in the same transaction and mirrored in memory when
        it has committed, even if the awaiting caller was cancelled meanwhile.
        """
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, self._run_tx, fn, args)

        def mirror(done: asyncio.Future[tuple[Any, _Tx]]) -> None:
            if not done.cancelled() and done.exception() is None:
                tx = done.result()[1]
                for cls, (rows, size) in tx.delta.items():
                    self._rows[cls] += rows
                    self._bytes[cls] += size
                if tx.added:
                    self.flow.ingested(tx.added)

        fut.add_done_callback(mirror)
        result, _ = await asyncio.shield(fut)
        return result

    def _run_tx(self, fn: Any, args: tuple[Any, ...]) -> tuple[Any, _Tx]:
        con = self._wcon
        assert con is not None
        tx = _Tx(con)
        con.execute("BEGIN IMMEDIATE")
        try:
            result = fn(tx, *args)
            if tx.delta:
                con.executemany(_ADD_TOTAL, [(r, b, c) for c, (r, b) in tx.delta.items()])
            con.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (SQLITE_FULL and SQLITE_IOERR can do
            # that at COMMIT): then ROLLBACK fails, harmlessly. The connection must come
            # out of here with no transaction open, or every later BEGIN would fail.
            with contextlib.suppress(sqlite3.Error):
                con.execute("ROLLBACK")
            self._scopes.clear()  # a scope made in this transaction is gone again
            if con.in_transaction:
                self._reopen_writer()
            raise
        return result, tx

    def _reopen_writer(self) -> None:
        """Replace a writer connection stuck in a transaction (writer thread)."""
        log.error("outbox_writer_reopened", reason="transaction could not be rolled back")
        old = self._wcon
        self._wcon = self._connect_writer()
        if old is not None:
            with contextlib.suppress(sqlite3.Error):
                old.close()

    async def _write(self, fn: Any, *args: Any) -> Any:
        """A transaction that frees space: wake appends waiting for budget afterwards.

        A failed commit (a disk full even for a delete) raises :class:`OutboxWriteError`
        and counts like a failed append: the caller retries (the forwarder leases the
        records again), nothing is left half done.
        """
        try:
            return await self._transaction(fn, *args)
        except sqlite3.Error as exc:
            self._write_errors += 1
            self._last_write_error = f"{type(exc).__name__}: {exc}"
            self._write_failing = True
            log.error("outbox_write_failed", error=self._last_write_error, op=fn.__name__)
            raise OutboxWriteError(f"outbox commit failed: {exc}") from exc
        else:
            if self._write_failing:
                self._write_failing = False
                log.info("outbox_write_recovered", write_errors=self._write_errors)
        finally:
            self._freed()

    def _write_group(self, tx: _Tx, group: list[_Pending], leased: AbstractSet[int]) -> None:
        for item in group:  # versions a source sends again on purpose: not "unchanged"
            for c in item.cursors:
                if isinstance(c, KeyMarks) and c.resend:
                    outbox_keys.release(tx.con, c)
        self._link(tx, group)
        if self.when_full == "drop_oldest":
            incoming = sum(r[5] for item in group for r in item.rows)
            self._make_room(tx, group, incoming, leased)
        rows = [r for item in group for r in item.rows]
        if rows:
            tx.added = _insert_records(tx.con, rows)
            for cls, (n, size) in tx.added.items():
                tx.count(cls, n, size)
        for item in group:
            item.result.stored = len(item.rows)
        cursors = [c for i in group for c in i.cursors if not isinstance(c, KeyMarks)]
        for item in group:
            for c in item.cursors:
                if isinstance(c, KeyMarks):
                    outbox_keys.apply(tx.con, self._scopes, c)
        if cursors:
            now = time.time()
            tx.con.executemany(
                "INSERT INTO cursors (source, key, value, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(source, key) DO UPDATE SET value = excluded.value, "
                "updated_at = excluded.updated_at",
                [(c.source, c.key, orjson.dumps(c.value).decode(), now) for c in cursors],
            )
        bad = [q for item in group for q in item.quarantine]
        if bad:
            self._write_quarantine(tx, bad)

    def _link(self, tx: _Tx, group: list[_Pending]) -> None:
        """Dedupe and chain the group's entity versions, in append order.

        Two versions of one entity in one group chain one after the other. Everything is
        decided from ``entity_versions`` inside this transaction, so a commit that fails
        changes nothing and the next attempt decides the same again.
        """
        names = [v[0] for item in group for v in item.versions if v is not None]
        if not names:
            for item in group:
                item.result.ids = [row[0] for row in item.rows]
            return
        known: dict[str, tuple[str, str | None]] = {
            e: (d, i) for e, d, i in tx.con.execute(_VERSIONS_OF, (_json_list(names),))
        }  # last_id is NULL for an entity last seen by a v2 agent
        latest: dict[str, tuple[str, str]] = {}
        link = records_module._link  # C or Python (tests switch it)
        for item in group:
            item.rows, item.result.ids, unchanged = link(
                records_module.NS.bytes, self.epoch, item.rows, item.versions, known, latest
            )
            item.result.unchanged += unchanged
        if latest:  # key order: neighbouring entities share B-tree pages
            entities = sorted(latest)
            fixed = "".join([latest[e][0] + latest[e][1] for e in entities]).encode()
            tx.con.execute(_SET_VERSIONS, (_json_list(entities), fixed))

    def _make_room(
        self, tx: _Tx, group: list[_Pending], incoming: int, leased: AbstractSet[int]
    ) -> None:
        """Drop the oldest readings (stored first, then incoming) until the group fits."""
        stored = sum(b for _, b in self._totals_in(tx).values())
        over = stored + incoming - self.max_bytes
        if over <= 0:
            return
        victims, freed, last = [], 0, 0
        while freed < over:
            batch = tx.con.execute(
                "SELECT seq, size FROM records WHERE class = 'reading' AND seq > ? "
                "ORDER BY seq LIMIT 1000",
                (last,),
            ).fetchall()
            if not batch:
                break
            for seq, size in batch:
                last = seq
                if seq in leased:
                    continue  # in flight: the forwarder decides its fate
                victims.append(seq)
                freed += size
                if freed >= over:
                    break
        if victims:
            self._delete_counted(tx, victims, "dropped:over_budget")
        over -= freed
        incoming_dropped = 0
        for item in group:  # still over: the incoming readings are the oldest left
            keep = []
            # item.rows are the records with an id in result.ids, in the same order
            positions = [i for i, rid in enumerate(item.result.ids) if rid is not None]
            for at, row in zip(positions, item.rows, strict=True):
                if over > 0 and row[3] == "reading":
                    over -= row[5]
                    item.result.dropped += 1
                    item.result.ids[at] = None
                else:
                    keep.append(row)
            item.rows = keep
            incoming_dropped += item.result.dropped
        if incoming_dropped:
            tx.con.execute(_BUMP, ("dropped:over_budget", incoming_dropped))
        if victims or incoming_dropped:
            log.warning(
                "outbox_readings_dropped",
                reason="over_budget",
                stored=len(victims),
                incoming=incoming_dropped,
            )

    @staticmethod
    def _totals_in(tx: _Tx) -> dict[str, tuple[int, int]]:
        rows = tx.con.execute("SELECT class, rows, bytes FROM totals").fetchall()
        return {
            c: (r + tx.delta.get(c, [0, 0])[0], b + tx.delta.get(c, [0, 0])[1]) for c, r, b in rows
        }

    def _delete_unleased(self, tx: _Tx, seqs: Sequence[int], counter: str) -> int:
        """:meth:`_delete_counted` of the ``seqs`` not leased by now (writer thread)."""
        guard = self._lease_guard
        return self._delete_counted(tx, [s for s in seqs if s not in guard], counter)

    def _delete_counted(self, tx: _Tx, seqs: Sequence[int], counter: str | None) -> int:
        gone = tx.con.execute(
            "DELETE FROM records WHERE seq IN (SELECT value FROM json_each(?)) "
            "RETURNING class, size",
            (_json_list(seqs),),
        ).fetchall()
        for cls, size in gone:
            tx.count(cls, -1, -size)
        if gone and counter:
            tx.con.execute(_BUMP, (counter, len(gone)))
        return len(gone)

    def _write_quarantine(self, tx: _Tx, bad: list[Quarantined]) -> None:
        now = time.time()
        tx.con.executemany(
            "INSERT INTO quarantine (source, reason, context, payload, at) VALUES (?, ?, ?, ?, ?)",
            [
                (q.source, q.reason, orjson.dumps(q.context, default=str).decode(), q.payload, now)
                for q in bad
            ],
        )
        counts: dict[str, int] = {}
        for q in bad:
            key = f"quarantined:{q.source}:{q.reason}"
            counts[key] = counts.get(key, 0) + 1
        tx.con.executemany(_BUMP, list(counts.items()))
        evicted = tx.con.execute(
            "DELETE FROM quarantine WHERE qid <= (SELECT MAX(qid) FROM quarantine) - ?",
            (self.quarantine_max_rows,),
        ).rowcount
        if evicted > 0:
            tx.con.execute(_BUMP, ("quarantine_evicted", evicted))

    def _reject_tx(self, tx: _Tx, items: Sequence[tuple[int, str]]) -> int:
        payload = orjson.dumps([[s, r] for s, r in items]).decode()
        if self._has_key_sets(tx):  # the upstream does not have these versions: say so
            bodies = tx.con.execute(
                "SELECT body FROM records WHERE class = 'business' AND seq IN "
                "(SELECT json_extract(value, '$[0]') FROM json_each(?))",
                (payload,),
            ).fetchall()
            outbox_keys.flag_undelivered(tx.con, (b for (b,) in bodies), undelivered=True)
        tx.con.execute(
            "INSERT OR REPLACE INTO dead_letters "
            "SELECT r.seq, r.id, r.entity_id, r.entity_type, r.class, r.created_at, r.size, "
            "r.body, json_extract(j.value, '$[1]'), ? FROM json_each(?) j JOIN records r "
            "ON r.seq = json_extract(j.value, '$[0]')",
            (time.time(), payload),
        )
        return self._delete_counted(tx, [s for s, _ in items], "dead_lettered")

    @staticmethod
    def _has_key_sets(tx: _Tx) -> bool:
        return tx.con.execute("SELECT 1 FROM key_scopes LIMIT 1").fetchone() is not None

    def _requeue_tx(self, tx: _Tx, seqs: Sequence[int] | None) -> int:
        where = "" if seqs is None else "WHERE seq IN (SELECT value FROM json_each(?))"
        args: tuple[Any, ...] = () if seqs is None else (_json_list(seqs),)
        back = tx.con.execute(
            "INSERT OR IGNORE INTO records "
            "(seq, id, entity_id, entity_type, class, created_at, size, body) "
            "SELECT seq, id, entity_id, entity_type, class, created_at, size, body "
            f"FROM dead_letters {where} RETURNING class, size, body",
            args,
        ).fetchall()
        for cls, size, _ in back:
            tx.count(cls, 1, size)
        if back and self._has_key_sets(tx):
            business = (b for c, _, b in back if c == RetentionClass.BUSINESS.value)
            outbox_keys.flag_undelivered(tx.con, business, undelivered=False)
        tx.con.execute(f"DELETE FROM dead_letters {where}", args)
        if back:
            tx.con.execute(_BUMP, ("requeued", len(back)))
        return len(back)

    async def _refresh_totals(self) -> None:
        """Re-read totals (another process, e.g. `edge-agent outbox requeue`, may change them).

        Runs on the writer thread, so it is ordered with our own transactions.
        """

        def read(tx: _Tx) -> dict[str, tuple[int, int]]:
            return self._totals_in(tx)

        loop = asyncio.get_running_loop()
        totals = await loop.run_in_executor(self._executor, self._read_sync, read)
        for cls, (rows, size) in totals.items():
            self._rows[cls] = rows
            self._bytes[cls] = size

    def _read_sync(self, fn: Any) -> Any:
        assert self._wcon is not None
        return fn(_Tx(self._wcon))

    # ------------------------------------------------------------------ delivery

    async def wait_for_data(self, timeout: float | None = None) -> None:
        """Wait until something was appended since the last call (or ``timeout``)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._data.wait()
        self._data.clear()

    async def lease(self, max_records: int, max_bytes: int) -> list[Leased]:
        """Hand out up to ``max_records``/``max_bytes`` records in append order.

        Records already leased are skipped, and so is every later record of an entity that
        has a record in flight, so per-entity order holds whatever the concurrency. The
        first record is always included, even when it alone exceeds ``max_bytes``.
        Leases live in memory: after a restart every record is simply leased again.
        """
        # Leases are serialized (a lock) and read on the writer thread: concurrent leases
        # must not choose the same rows, and the read must see every ack committed so far.
        # The read connection cannot promise that: a query of stats() in progress there
        # pins an older snapshot, and a lease reading through it handed out acked records.
        async with self._lease_lock:
            loop = asyncio.get_running_loop()
            out: list[Leased] = await loop.run_in_executor(
                self._executor, self._lease_sync, max_records, max_bytes, dict(self._leased)
            )
            for item in out:
                self._leased[item.seq] = item
            return out

    def _lease_sync(
        self, max_records: int, max_bytes: int, leased: dict[int, Leased]
    ) -> list[Leased]:
        assert self._wcon is not None
        busy = {lease.entity_id for lease in leased.values()}
        out: list[Leased] = []
        total = 0
        last = 0
        while True:
            rows = self._wcon.execute(
                "SELECT seq, id, entity_id, entity_type, class, body FROM records "
                "WHERE seq > ? ORDER BY seq LIMIT ?",
                (last, max_records + len(leased) + 1),
            ).fetchall()
            if not rows:
                return out
            for seq, rid, eid, etype, cls, body in rows:
                last = seq
                if seq in leased or eid in busy:
                    busy.add(eid)
                    continue
                full = bytes(body[:-1]) + b',"seq":' + str(seq).encode() + b"}"
                if out and (len(out) >= max_records or total + len(full) > max_bytes):
                    return out
                out.append(Leased(seq, rid, eid, etype, cls, len(full), full))
                self._lease_guard.add(seq)
                total += len(full)

    def release(self, seqs: Iterable[int]) -> None:
        """Give leased records back without a decision (they are leased again later)."""
        for seq in seqs:
            self._leased.pop(seq, None)
            self._lease_guard.discard(seq)
        self._data.set()

    async def ack(self, seqs: Sequence[int]) -> int:
        """Delete records the upstream accepted. Returns how many were deleted."""
        if not seqs:
            return 0
        try:
            done = int(await self._write(self._delete_counted, list(seqs), None))
        finally:
            self.release(seqs)
        self.flow.delivered(done)
        return done

    async def reject(self, items: Sequence[tuple[int, str]]) -> int:
        """Move records to the dead-letter table with their reasons."""
        if not items:
            return 0
        try:
            n = int(await self._write(self._reject_tx, list(items)))
        finally:
            self.release(s for s, _ in items)
        if n:
            log.warning("outbox_dead_lettered", count=n, reasons=sorted({r for _, r in items})[:5])
        return n

    async def requeue_dead(self, seqs: Sequence[int] | None = None) -> int:
        """Put dead letters back (all when ``seqs`` is None) at their original position."""
        n = int(await self._write(self._requeue_tx, None if seqs is None else list(seqs)))
        self._data.set()
        return n

    # ------------------------------------------------------------------ cursors, retention

    async def cursor(self, source: str, key: str) -> Any | None:
        """The last committed cursor value of ``source``/``key`` (None if never set)."""
        async with self._rdb.execute(
            "SELECT value FROM cursors WHERE source = ? AND key = ?", (source, key)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else orjson.loads(row[0])

    async def cursors(self, source: str) -> dict[str, Any]:
        """Every committed cursor of ``source``."""
        async with self._rdb.execute(
            "SELECT key, value FROM cursors WHERE source = ?", (source,)
        ) as cur:
            return {k: orjson.loads(v) for k, v in await cur.fetchall()}

    def key_set(self, source: str, name: str) -> outbox_keys.KeySet:
        """Reads of the key set ``name`` of ``source`` (written through :class:`KeyMarks`)."""
        return outbox_keys.KeySet(self._read_keys, self._scopes, source, name)

    async def _read_keys(self, fn: Any) -> Any:
        # On the writer thread, like lease(): ordered with commits, sees every one of them.
        if self._executor is None:
            raise RuntimeError("outbox is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._read_sync, lambda tx: fn(tx.con))

    async def enforce_max_age(self, now: float | None = None) -> int:
        """Drop readings older than ``readings_max_age`` (counted). Returns how many."""
        if self.readings_max_age is None:
            return 0
        cutoff = (now or time.time()) - self.readings_max_age
        victims: list[int] = []
        last = 0
        while True:
            async with self._rdb.execute(
                "SELECT seq, created_at FROM records WHERE class = 'reading' AND seq > ? "
                "ORDER BY seq LIMIT 1000",
                (last,),
            ) as cur:
                rows = list(await cur.fetchall())
            young = [s for s, at in rows if at >= cutoff]
            victims += [s for s, at in rows if at < cutoff]  # leased ones: _delete_unleased
            if not rows or young:
                break
            last = rows[-1][0]
        if not victims:
            return 0
        n = int(await self._write(self._delete_unleased, victims, "dropped:max_age"))
        log.warning("outbox_readings_dropped", reason="max_age", count=n)
        return n

    async def run_maintenance(self, interval: float = 60.0) -> None:
        """Periodic housekeeping (max age, totals written by other processes)."""
        while True:
            await asyncio.sleep(interval)
            await self.enforce_max_age()
            await self._refresh_totals()
            self._freed()

    # ------------------------------------------------------------------ inspection

    def _judge(self) -> None:
        """Enter the state the write, disk and budget figures say (since = when it
        changed). A low disk goes before the budget: someone must free space."""
        disk = None if self._disk is None else self._disk.state
        if self._write_failing:
            self._tracker.set(State.FAILED, self._last_write_error)
        elif disk is not None and disk.low:
            self._tracker.set(State.BLOCKED, disk.reason(), detail=DISK_LOW)
        elif self._blocked:
            self._tracker.set(State.BLOCKED, "sources are paused")
        else:
            self._tracker.set(State.OK)

    def health(self) -> Component:
        """The outbox as a component: ``failed`` while its latest commit failed (disk
        full, I/O error), ``blocked`` (detail ``disk_low``) while free disk space is
        below the reserve, ``blocked`` while an append waits for byte budget (every
        source is paused), else ``ok``."""
        self._judge()
        return Component(Kind.OUTBOX, "", self._tracker.health)

    async def stats(self) -> OutboxStats:
        """Figures for status, metrics and ``edge-agent outbox stats``."""
        db = self._rdb
        async with db.execute("SELECT created_at FROM records ORDER BY seq LIMIT 1") as cur:
            oldest = await cur.fetchone()
        async with db.execute(  # the partial index records_readings: one row
            "SELECT created_at FROM records WHERE class = 'reading' ORDER BY seq LIMIT 1"
        ) as cur:
            oldest_reading = await cur.fetchone()
        async with db.execute("SELECT COUNT(*) FROM dead_letters") as cur:
            dead = (await cur.fetchone() or (0,))[0]
        async with db.execute("SELECT COUNT(*) FROM quarantine") as cur:
            quarantined = (await cur.fetchone() or (0,))[0]
        async with db.execute("SELECT name, value FROM counters ORDER BY name") as cur:
            counters: dict[str, int] = {n: v for n, v in await cur.fetchall()}  # noqa: C416
        await self._refresh_totals()
        return OutboxStats(
            rows=dict(self._rows),
            bytes=dict(self._bytes),
            max_bytes=self.max_bytes,
            oldest_age_seconds=None if oldest is None else max(0.0, time.time() - oldest[0]),
            oldest_reading_age_seconds=None
            if oldest_reading is None
            else max(0.0, time.time() - oldest_reading[0]),
            dead_letters=dead,
            quarantined=quarantined,
            counters=counters,
            leased=len(self._leased),
            blocked_appends=self._blocked,
            write_errors=self._write_errors,
            last_write_error=self._last_write_error,
            recovered_from=self.recovered_from,
            epoch=self.epoch,
            write_failing=self._write_failing,
            disk=None if self._disk is None else self._disk.state,
            disk_blocked_appends=self._disk_blocked,
        )

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """Dead letters, oldest first, with their reasons and envelopes."""
        async with self._rdb.execute(
            "SELECT seq, id, entity_type, reason, rejected_at, body FROM dead_letters "
            "ORDER BY seq LIMIT ?",
            (limit,),
        ) as cur:
            rows = await cur.fetchall()
        return [
            {
                "seq": seq,
                "id": rid,
                "entity_type": etype,
                "reason": reason,
                "rejected_at": datetime.fromtimestamp(at, UTC).isoformat(),
                "record": orjson.loads(body),
            }
            for seq, rid, etype, reason, at, body in rows
        ]

    async def quarantined(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent quarantined inputs."""
        async with self._rdb.execute(
            "SELECT qid, source, reason, context, payload, at FROM quarantine "
            "ORDER BY qid DESC LIMIT ?",
            (limit,),
        ) as cur:
            rows = await cur.fetchall()
        return [
            {
                "qid": qid,
                "source": source,
                "reason": reason,
                "context": orjson.loads(ctx),
                "payload": None
                if payload is None
                else bytes(payload)[:4096].decode("utf-8", "backslashreplace"),
                "at": datetime.fromtimestamp(at, UTC).isoformat(),
            }
            for qid, source, reason, ctx, payload, at in rows
        ]
