"""The known key set of an entity, kept compact for reconciliation.

Between reconciliations the set is one zlib-compressed blob of the sorted remote ids
(``\\0``-separated; SAP keys like ``000004001234`` compress to 2-4 bytes each), persisted
as an outbox cursor in the same transaction as the ``delete`` records it produced, plus
the ids upserted since (a plain set, bounded by the change volume between two
reconciliations). A reconciliation spills the current ids to a temporary SQLite file and
lets SQLite compute the difference, so its memory stays flat at any table size; disk use
is about 2x the key bytes for the duration.
"""

from __future__ import annotations

import base64
import sqlite3
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

SEP = b"\0"


def pack(keys: Iterable[str]) -> str:
    """Sorted ids -> base64 text of the compressed blob."""
    comp = zlib.compressobj(6)
    parts = [comp.compress(k.encode() + SEP) for k in keys]
    parts.append(comp.flush())
    return base64.b64encode(b"".join(parts)).decode()


def unpack(blob: str | None) -> Iterator[str]:
    """Stream the ids of a packed blob (decompressed piecewise)."""
    if not blob:
        return
    raw = base64.b64decode(blob)
    decomp = zlib.decompressobj()
    tail = b""
    for start in range(0, len(raw), 1 << 16):
        tail += decomp.decompress(raw[start : start + (1 << 16)])
        *done, tail = tail.split(SEP)
        yield from (d.decode() for d in done)
    tail += decomp.flush()
    yield from (d.decode() for d in tail.split(SEP) if d)


class KeyDiff:
    """A temporary SQLite file holding the current ids; computes what vanished.

    Blocking calls: run them in a worker thread.
    """

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="edge-agent-keys-")
        self._db = sqlite3.connect(Path(self._dir.name) / "keys.db", check_same_thread=False)
        self._db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
            "CREATE TABLE cur (k TEXT PRIMARY KEY) WITHOUT ROWID;"
            "CREATE TABLE old (k TEXT PRIMARY KEY) WITHOUT ROWID;"
        )

    def add_current(self, keys: Iterable[str]) -> None:
        """Add ids read from the database now."""
        self._db.executemany("INSERT OR IGNORE INTO cur VALUES (?)", ((k,) for k in keys))

    def add_known(self, keys: Iterable[str]) -> None:
        """Add ids known from before (the last blob and the ids upserted since)."""
        self._db.executemany("INSERT OR IGNORE INTO old VALUES (?)", ((k,) for k in keys))

    def vanished(self, batch: int) -> Iterator[list[str]]:
        """Known ids no longer in the database, in batches."""
        cur = self._db.execute("SELECT k FROM old EXCEPT SELECT k FROM cur ORDER BY 1")
        while rows := cur.fetchmany(batch):
            yield [r[0] for r in rows]

    def packed_current(self) -> str:
        """The current ids as the next known-set blob."""
        return pack(r[0] for r in self._db.execute("SELECT k FROM cur ORDER BY k"))

    def count_current(self) -> int:
        """How many ids the database holds now."""
        return int(self._db.execute("SELECT COUNT(*) FROM cur").fetchone()[0])

    def close(self) -> None:
        """Delete the temporary file."""
        self._db.close()
        self._dir.cleanup()


class AddedKeys:
    """Ids upserted since the last reconciliation, in a temporary SQLite file.

    A row created and hard-deleted between two reconciliations is in neither snapshot;
    this set is how its ``delete`` is still sent. On disk, so an initial sync of millions
    of rows does not grow memory. Blocking calls: run them in a worker thread.
    """

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="edge-agent-added-")
        self._db = sqlite3.connect(Path(self._dir.name) / "added.db", check_same_thread=False)
        self._db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
            "CREATE TABLE added (k TEXT PRIMARY KEY) WITHOUT ROWID;"
        )
        self.count = 0

    def update(self, upserted: Iterable[str], deleted: Iterable[str]) -> None:
        """Add upserted ids, forget deleted ones."""
        with self._db:
            cur = self._db.executemany(
                "INSERT OR IGNORE INTO added VALUES (?)", ((k,) for k in upserted)
            )
            self.count += max(cur.rowcount, 0)
            cur = self._db.executemany("DELETE FROM added WHERE k = ?", ((k,) for k in deleted))
            self.count -= max(cur.rowcount, 0)

    def __iter__(self) -> Iterator[str]:
        for (k,) in self._db.execute("SELECT k FROM added"):
            yield k

    def clear(self) -> None:
        """Start over (after a reconciliation took these into its snapshot)."""
        with self._db:
            self._db.execute("DELETE FROM added")
        self.count = 0

    def close(self) -> None:
        """Delete the temporary file."""
        self._db.close()
        self._dir.cleanup()
