"""Key sets: what a source has told the upstream about each of its keys, in the outbox.

A SQL source's reconciliation asks, per entity and key, what the upstream holds: whether
the last version appended was an upsert (the entity is live upstream) or a delete, that
version's content digest, per-field digests of it (to name the fields of a drift), whether
the upstream refused it (dead letter), and which reconciliation pass last saw the key in
the database. One row per key (``source_keys``), changed in the same transaction as the
records it describes: a source passes a :class:`agent.outbox.KeyMarks` with its cursor.
Memory stays flat at any table size; the rows live on disk, about 60 bytes per key.

Everything here runs on the outbox writer thread (inside its transactions, or as reads
ordered with them), with the writer's ``sqlite3`` connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import orjson

if TYPE_CHECKING:
    from agent.outbox import KeyMarks

SCHEMA = """
CREATE TABLE IF NOT EXISTS key_scopes (
    id          INTEGER PRIMARY KEY,
    source      TEXT NOT NULL,
    name        TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    UNIQUE (source, name)
);
CREATE TABLE IF NOT EXISTS source_keys (
    scope       INTEGER NOT NULL,
    key         TEXT NOT NULL,
    mark        INTEGER NOT NULL,
    live        INTEGER NOT NULL,
    digest      INTEGER,
    fields      BLOB,
    undelivered INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS key_layouts (
    scope INTEGER NOT NULL,
    tag   INTEGER NOT NULL,
    names TEXT NOT NULL,
    PRIMARY KEY (scope, tag)
) WITHOUT ROWID;
"""

# One statement per append, as for the records (outbox._INSERT_MANY): the entries as a
# JSON array (?1), their field digests concatenated in one blob (?2) and cut back apart
# with substr(). SQLite evaluates every SET expression on the old row, so ``digest`` can
# be compared before it is replaced.
_VERSIONS = (
    "INSERT INTO source_keys (scope, key, mark, live, digest, fields, undelivered) "
    "SELECT ?3, json_extract(value, '$[0]'), ?4, json_extract(value, '$[1]'), "
    "json_extract(value, '$[2]'), CASE WHEN json_extract(value, '$[4]') > 0 THEN "
    "substr(?2, json_extract(value, '$[3]'), json_extract(value, '$[4]')) END, 0 "
    "FROM json_each(?1) WHERE true ORDER BY key "
    "ON CONFLICT (scope, key) DO UPDATE SET mark = excluded.mark, live = excluded.live, "
    "fields = CASE WHEN excluded.fields IS NOT NULL THEN excluded.fields "
    "WHEN excluded.digest IS source_keys.digest THEN source_keys.fields END, "
    "undelivered = CASE WHEN ?5 = 0 AND excluded.digest IS source_keys.digest "
    "THEN source_keys.undelivered ELSE 0 END, "
    "digest = excluded.digest"
)
_IN_JSON = "key IN (SELECT value FROM json_each(?))"
_LOOKUP = (
    "SELECT json_group_array(json_array(key, live, digest, hex(fields), undelivered)) "
    f"FROM source_keys WHERE scope = ? AND {_IN_JSON}"
)
# Of a {key: digest} object, the keys whose row is not simply "that version, its field
# digests known, delivered": absent, another digest (or none), no field digests, or
# refused upstream. The usual case, a chunk of unchanged rows, returns an empty array.
# (An object rather than pairs: json_each hands key and value out directly, 2-3 times
# faster than json_extract() of each pair.)
_DIFFERING = (
    "SELECT json_group_array(json_array(j.key, s.key IS NOT NULL, s.live, s.digest, "
    "hex(s.fields), s.undelivered)) "
    "FROM json_each(?2) j LEFT JOIN source_keys s ON s.scope = ?1 AND s.key = j.key "
    "WHERE s.digest IS NULL OR s.digest != j.value OR s.fields IS NULL OR s.undelivered"
)


def _key_rows(blob: str | None) -> dict[str, KeyRow]:
    if not blob:
        return {}
    return {
        k: KeyRow(bool(lv), d, bytes.fromhex(f) if f else None, bool(u))
        for k, lv, d, f, u in orjson.loads(blob)
    }


class KeyRow(NamedTuple):
    """What the outbox knows about one key."""

    live: bool
    """The last version appended is an upsert."""
    digest: int | None
    """:func:`digest_of` its content hash (None: not known, e.g. seeded at an upgrade)."""
    fields: bytes | None
    """Per-field digests of that version (see agent.sources.sql.drift), or None."""
    undelivered: bool
    """The upstream refused that version (it went to the dead-letter table)."""


def digest_of(content_hash: str) -> int:
    """The 60-bit integer kept per key: the first 15 hex digits of the SHA-256 hash.

    An integer rather than text: 8 bytes per key instead of 32 at a million keys, and a
    collision would have to hit two versions of the same key (2^-60).
    """
    return int(content_hash[7:22], 16)


class ScopeCache:
    """Scope ids by (source, name), per outbox connection (writer thread only)."""

    def __init__(self) -> None:
        self.ids: dict[tuple[str, str], int] = {}

    def get(self, con: sqlite3.Connection, source: str, name: str) -> int | None:
        """The id of a scope, or None when it was never written."""
        sid = self.ids.get((source, name))
        if sid is None:
            row = con.execute(
                "SELECT id FROM key_scopes WHERE source = ? AND name = ?", (source, name)
            ).fetchone()
            if row is None:
                return None
            sid = self.ids[(source, name)] = int(row[0])
        return sid

    def create(self, con: sqlite3.Connection, source: str, name: str, entity_type: str) -> int:
        """The id of a scope, made when missing (inside a write transaction)."""
        sid = self.get(con, source, name)
        if sid is None:
            cur = con.execute(
                "INSERT INTO key_scopes (source, name, entity_type) VALUES (?, ?, ?)",
                (source, name, entity_type),
            )
            sid = self.ids[(source, name)] = int(cur.lastrowid or 0)
        return sid

    def clear(self) -> None:
        """Forget cached ids (after a rolled-back transaction may have made one)."""
        self.ids.clear()


def apply(con: sqlite3.Connection, scopes: ScopeCache, marks: KeyMarks) -> None:
    """Write ``marks`` inside the caller's transaction."""
    sid = scopes.create(con, marks.source, marks.key, marks.entity_type)
    if marks.seed:
        con.execute(
            "INSERT OR IGNORE INTO source_keys (scope, key, mark, live) "
            "SELECT ?, value, ?, 1 FROM json_each(?)",
            (sid, marks.mark, orjson.dumps(list(marks.seed)).decode()),
        )
    if marks.versions:
        entries: list[tuple[str, int, int | None, int, int]] = []
        blobs: list[bytes] = []
        offset = 1  # substr() counts from 1
        for key, live, digest, fields in marks.versions:
            size = len(fields) if fields else 0
            entries.append((key, int(live), digest, offset, size))
            if size:
                blobs.append(fields)  # type: ignore[arg-type]
                offset += size
        con.execute(
            _VERSIONS,
            (orjson.dumps(entries).decode(), b"".join(blobs), sid, marks.mark, int(marks.sent)),
        )
    if marks.seen:
        con.execute(
            f"UPDATE source_keys SET mark = ? WHERE scope = ? AND {_IN_JSON}",
            (marks.mark, sid, orjson.dumps(list(marks.seen)).decode()),
        )
    if marks.forget:
        con.execute(
            f"DELETE FROM source_keys WHERE scope = ? AND {_IN_JSON}",
            (sid, orjson.dumps(list(marks.forget)).decode()),
        )
    if marks.layout is not None:
        tag, names = marks.layout
        con.execute(
            "INSERT OR IGNORE INTO key_layouts (scope, tag, names) VALUES (?, ?, ?)",
            (sid, tag, orjson.dumps(list(names)).decode()),
        )


def release(con: sqlite3.Connection, marks: KeyMarks) -> None:
    """Let the next version of ``marks.resend`` be stored even if unchanged.

    Clears the digest the outbox deduplicates against (``entity_versions``, keyed like
    ``outbox._version``); the chain (``last_id``) stays, so the re-sent version gets a
    new id after the refused one.
    """
    prefix = f"{marks.source}:{marks.entity_type}:"
    con.execute(
        "UPDATE entity_versions SET digest = '' "
        "WHERE entity IN (SELECT ? || value FROM json_each(?))",
        (prefix, orjson.dumps(list(marks.resend)).decode()),
    )


def flag_undelivered(
    con: sqlite3.Connection, bodies: Iterable[bytes], undelivered: bool
) -> None:
    """Mark the keys of dead-lettered (or requeued) entity versions.

    Only where the version is still the key's last one (same digest): a newer version
    appended after it is what the upstream gets next, so nothing is owed.
    """
    wanted: list[tuple[str, str, str, int]] = []
    for body in bodies:
        rec = orjson.loads(body)
        chash = rec.get("content_hash")
        source = rec.get("source") or {}
        if isinstance(chash, str) and chash.startswith("sha256:") and len(chash) == 71:
            wanted.append(
                (str(source.get("name")), rec["entity_type"], rec["remote_id"], digest_of(chash))
            )
    if not wanted:
        return
    con.execute(
        "UPDATE source_keys SET undelivered = ? WHERE (scope, key, digest) IN ("
        "SELECT s.id, json_extract(j.value, '$[2]'), json_extract(j.value, '$[3]') "
        "FROM json_each(?) j JOIN key_scopes s ON s.source = json_extract(j.value, '$[0]') "
        "AND s.entity_type = json_extract(j.value, '$[1]'))",
        (int(undelivered), orjson.dumps(wanted).decode()),
    )


T = TypeVar("T")


class KeySet:
    """Reads of one scope's keys, run on the outbox writer thread (ordered with commits)."""

    def __init__(
        self,
        run: Callable[[Callable[[sqlite3.Connection], T]], Awaitable[T]],
        scopes: ScopeCache,
        source: str,
        name: str,
    ) -> None:
        self._run: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]] = run
        self._scopes = scopes
        self.source = source
        self.name = name

    def _sid(self, con: sqlite3.Connection) -> int | None:
        return self._scopes.get(con, self.source, self.name)

    async def lookup(self, keys: Sequence[str]) -> dict[str, KeyRow]:
        """What is known of ``keys`` (keys never appended are absent)."""

        def read(con: sqlite3.Connection) -> str | None:
            sid = self._sid(con)
            if sid is None or not keys:
                return None
            (blob,) = con.execute(_LOOKUP, (sid, orjson.dumps(list(keys)).decode())).fetchone()
            return blob  # type: ignore[no-any-return]

        # One row, one JSON text: the writer thread takes the GIL once, not once per key
        # (with the event loop busy mapping, every re-take waited for it: 60 ms instead
        # of 15 for 5,000 keys). Decoded here, on the loop.
        return _key_rows(await self._run(read))

    async def differing(self, versions: Mapping[str, int]) -> dict[str, KeyRow | None]:
        """Of ``{key: digest}``, the keys that are not held as exactly that version with
        its field digests known and delivered: ``None`` for a key never appended, else
        what is known of it. Keys left out of the answer are held as given."""

        def read(con: sqlite3.Connection) -> str | None:
            sid = self._sid(con)
            if not versions:
                return None
            args = (sid or -1, orjson.dumps(versions).decode())
            (blob,) = con.execute(_DIFFERING, args).fetchone()
            return blob  # type: ignore[no-any-return]

        blob = await self._run(read)
        if not blob:
            return {}
        return {
            k: KeyRow(bool(lv), d, bytes.fromhex(f) if f else None, bool(u)) if found else None
            for k, found, lv, d, f, u in orjson.loads(blob)
        }

    async def stale(self, below: int, after: str | None, limit: int) -> list[tuple[str, bool]]:
        """``(key, live)`` of keys whose mark is below ``below``, in key order after ``after``."""

        def read(con: sqlite3.Connection) -> list[tuple[str, bool]]:
            sid = self._sid(con)
            if sid is None:
                return []
            rows = con.execute(
                "SELECT key, live FROM source_keys WHERE scope = ? AND key > ? AND mark < ? "
                "ORDER BY key LIMIT ?",
                (sid, after or "", below, limit),
            ).fetchall()
            return [(k, bool(lv)) for k, lv in rows]

        return await self._run(read)  # type: ignore[no-any-return]

    async def count(self) -> tuple[int, int]:
        """``(keys, live keys)`` of the scope."""

        def read(con: sqlite3.Connection) -> tuple[int, int]:
            sid = self._sid(con)
            if sid is None:
                return 0, 0
            total, live = con.execute(
                "SELECT COUNT(*), COALESCE(SUM(live), 0) FROM source_keys WHERE scope = ?", (sid,)
            ).fetchone()
            return int(total), int(live)

        return await self._run(read)  # type: ignore[no-any-return]

    async def layouts(self) -> dict[int, tuple[str, ...]]:
        """Field layouts by tag (what the bytes of ``KeyRow.fields`` stand for)."""

        def read(con: sqlite3.Connection) -> dict[int, tuple[str, ...]]:
            sid = self._sid(con)
            if sid is None:
                return {}
            rows = con.execute(
                "SELECT tag, names FROM key_layouts WHERE scope = ?", (sid,)
            ).fetchall()
            return {int(t): tuple(orjson.loads(n)) for t, n in rows}

        return await self._run(read)  # type: ignore[no-any-return]
