"""Entity version identity: chained ids, the outbox epoch, the v2 -> v3 upgrade.

DESIGN.md "Delivery guarantee": an entity version's id names one transition,
``uuid5(NS, f"{entity_id}:{content_hash}:{prev}")`` with ``prev`` the id of the entity's
previous version in this outbox, or the outbox's epoch for its first. So A, B, A is three
versions upstream (not A, B and a duplicate), a redelivery keeps its id, and a fresh
outbox never repeats an id of an older one. The property test over random sequences is
tests/test_outbox_chain_model.py; the end-to-end one is in tests/test_forwarder.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path

import pytest

from agent.errors import OutboxWriteError
from agent.outbox import SCHEMA_VERSION, Cursor, Outbox
from agent.records import EntityType, Record, chain_id
from tests.outbox_helpers import SRC, reading, stored_json, work_order


def version(key: str, state: str) -> Record:
    """A version of work order ``key`` whose content is ``state``."""
    return Record.entity(SRC, EntityType.WORK_ORDER, key, {"state": state})


def expected_ids(epoch: str, states: list[str], key: str = "WO1") -> list[str]:
    """The chain a sequence of distinct consecutive ``states`` must get."""
    ids, prev = [], epoch
    for state in states:
        rec = version(key, state)
        prev = chain_id(rec.entity_id, rec.content_hash, prev)
        ids.append(prev)
    return ids


async def on_writer(box: Outbox, sql: str) -> None:
    """Run a statement on the outbox's writer connection, in its thread."""
    assert box._wcon is not None
    await asyncio.get_running_loop().run_in_executor(box._executor, box._wcon.execute, sql)


async def stored(box: Outbox) -> list[tuple[str, bytes]]:
    """``(id column, body)`` of every stored record, in seq order."""
    async with box._rdb.execute("SELECT id, body FROM records ORDER BY seq") as cur:
        return [(i, bytes(b)) for i, b in await cur.fetchall()]


# ---------------------------------------------------------------------- the chain


async def test_a_b_a_b_are_four_versions_with_chained_ids(tmp_path: Path) -> None:
    records = [version("WO1", s) for s in "ABAB"]
    async with Outbox(tmp_path / "o.db") as box:
        results = [await box.append([rec]) for rec in records]
        assert [r.stored for r in results] == [1, 1, 1, 1]
        ids = [r.ids[0] for r in results]
        assert ids == expected_ids(box.epoch, list("ABAB"))
        assert len(set(ids)) == 4, "a return to an earlier content is a new version"
        rows = await stored(box)
    # The id is in the column the forwarder acks by and in the body the upstream gets;
    # nothing else of the envelope changed.
    assert rows == [(rid, stored_json(rec, rid)) for rec, rid in zip(records, ids, strict=True)]


async def test_an_unchanged_version_is_not_appended(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as box:
        first = await box.append([version("WO1", "A"), version("WO2", "A")])
        again = await box.append([version("WO1", "A"), version("WO2", "B")])
        assert (again.stored, again.unchanged) == (1, 1)
        assert again.ids[0] is None
        assert again.ids[1] == chain_id(
            version("WO2", "B").entity_id, version("WO2", "B").content_hash, first.ids[1]
        )


async def test_versions_in_one_append_and_one_group_chain_in_order(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as box:
        one = await box.append([version("WO1", s) for s in "ABBA"])  # B twice: one version
        assert (one.stored, one.unchanged) == (3, 1)
        assert [i for i in one.ids if i] == expected_ids(box.epoch, list("ABA"))
        # Concurrent appends share one transaction (group commit), in queue order.
        results = await asyncio.gather(*(box.append([version("WO2", s)]) for s in "ABAAB"))
        assert [r.stored for r in results] == [1, 1, 1, 0, 1]
        got = [r.ids[0] for r in results if r.ids[0]]
        assert got == expected_ids(box.epoch, list("ABAB"), key="WO2")


async def test_readings_are_not_chained_or_deduplicated(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as box:
        r = reading("meter", 1)
        result = await box.append([r, r])
        assert result.ids == [r.id, r.id]  # an observation's id is its own (and idempotent)


async def test_the_chain_survives_reopen(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as box:
        epoch = box.epoch
        a = await box.append([version("WO1", "A")])
    async with Outbox(tmp_path / "o.db") as box:
        assert box.epoch == epoch
        assert (await box.append([version("WO1", "A")])).unchanged == 1
        b = await box.append([version("WO1", "B")])
    assert [a.ids[0], b.ids[0]] == expected_ids(epoch, ["A", "B"])


async def test_a_failed_commit_changes_nothing_of_the_chain(tmp_path: Path) -> None:
    """Disk full while B and C commit: nothing of them is remembered; B, C later chain
    from A as if the failed attempt had never been."""
    async with Outbox(tmp_path / "o.db") as box:
        a = await box.append([version("WO1", "A")])
        await on_writer(box, "PRAGMA max_page_count=1")
        big = [work_order(f"pad{i}", pad=4000) for i in range(50)]
        with pytest.raises(OutboxWriteError):
            await box.append([version("WO1", "B"), version("WO1", "C"), *big])
        await on_writer(box, "PRAGMA max_page_count=1073741823")
        again = await box.append([version("WO1", "B"), version("WO1", "C")])
        assert again.stored == 2
        assert [a.ids[0], *again.ids] == expected_ids(box.epoch, list("ABC"))


async def test_a_redelivery_sends_the_same_id_and_bytes(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as box:
        result = await box.append([version("WO1", s) for s in "AB"])
        first = await box.lease(10, 1 << 20)
        box.release(x.seq for x in first)  # the answer was lost
        second = await box.lease(10, 1 << 20)
    async with Outbox(tmp_path / "o.db") as box:  # and after a restart
        third = await box.lease(10, 1 << 20)
    assert [x.id for x in first] == result.ids
    assert [(x.id, x.body) for x in first] == [(x.id, x.body) for x in second]
    assert [(x.id, x.body) for x in first] == [(x.id, x.body) for x in third]


async def test_a_record_built_by_hand_is_chained_too(tmp_path: Path) -> None:
    """A record not made by the builder has no id offset: it is encoded again."""
    made = version("WO1", "A")
    fields = {f: getattr(made, f) for f in made.__dataclass_fields__ if not f.startswith("_")}
    by_hand = Record(**{**fields, "id": "not-a-uuid"})
    async with Outbox(tmp_path / "o.db") as box:
        result = await box.append([by_hand])
        rows = await stored(box)
        assert result.ids == expected_ids(box.epoch, ["A"])
    assert rows == [(result.ids[0], stored_json(made, result.ids[0]))]


# ---------------------------------------------------------------------- the epoch


async def test_a_fresh_outbox_has_its_own_epoch_and_never_repeats_an_id(
    tmp_path: Path,
) -> None:
    async with Outbox(tmp_path / "one.db") as one, Outbox(tmp_path / "two.db") as two:
        assert uuid.UUID(one.epoch).version == 4
        assert one.epoch != two.epoch
        assert (await one.stats()).as_dict()["epoch"] == one.epoch
        a1 = await one.append([version("WO1", "A")])
        a2 = await two.append([version("WO1", "A")])
    assert a1.ids != a2.ids
    assert a1.ids[0] != version("WO1", "A").id  # nor the unchained (v2) id


async def test_a_corrupt_outbox_is_replaced_by_one_with_a_new_epoch(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with Outbox(path) as box:
        old_epoch = box.epoch
        old = await box.append([version("WO1", s) for s in "AB"])
    path.write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    async with Outbox(path) as box:
        assert box.recovered_from is not None
        assert box.epoch != old_epoch
        new = await box.append([version("WO1", s) for s in "AB"])
        assert new.ids == expected_ids(box.epoch, list("AB"))
    assert set(new.ids).isdisjoint(old.ids)


# ---------------------------------------------------------------------- v2 -> v3

# Schema version 2 as agents up to this change created it (agent/outbox.py at 97cf706).
V2_SCHEMA = """
CREATE TABLE records (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL,
    entity_id TEXT NOT NULL, entity_type TEXT NOT NULL, class TEXT NOT NULL,
    created_at REAL NOT NULL, size INTEGER NOT NULL, body BLOB NOT NULL);
CREATE INDEX records_readings ON records(seq) WHERE class = 'reading';
CREATE TABLE dead_letters (seq INTEGER PRIMARY KEY, id TEXT NOT NULL,
    entity_id TEXT NOT NULL, entity_type TEXT NOT NULL, class TEXT NOT NULL,
    created_at REAL NOT NULL, size INTEGER NOT NULL, body BLOB NOT NULL,
    reason TEXT NOT NULL, rejected_at REAL NOT NULL);
CREATE TABLE quarantine (qid INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL,
    reason TEXT NOT NULL, context TEXT NOT NULL, payload BLOB, at REAL NOT NULL);
CREATE TABLE cursors (source TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    updated_at REAL NOT NULL, PRIMARY KEY (source, key)) WITHOUT ROWID;
CREATE TABLE entity_versions (entity TEXT PRIMARY KEY, digest TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE totals (class TEXT PRIMARY KEY, rows INTEGER NOT NULL, bytes INTEGER NOT NULL)
    WITHOUT ROWID;
PRAGMA user_version=2;
"""


def write_v2_file(path: Path, queued: list[Record], dead: Record) -> None:
    """An outbox as a v2 agent left it: queued records under their v2 (unchained) ids,
    one dead letter, a cursor, a counter, and the dedupe state of every entity."""
    con = sqlite3.connect(path, isolation_level=None)
    con.executescript(V2_SCHEMA)
    con.execute("BEGIN")
    for rec in queued:
        body = rec.to_json()
        cls = rec.retention.value
        con.execute(
            "INSERT INTO records (id, entity_id, entity_type, class, created_at, size, body) "
            "VALUES (?, ?, ?, ?, 1.0, ?, ?)",
            (rec.id, rec.entity_id, rec.entity_type.value, cls, len(body), body),
        )
        if cls == "business":
            entity = f"{rec.source.name}:{rec.entity_type}:{rec.remote_id}"
            con.execute(
                "INSERT OR REPLACE INTO entity_versions VALUES (?, ?)",
                (entity, rec.content_hash[7:39]),
            )
    body = dead.to_json()
    con.execute(
        "INSERT INTO dead_letters VALUES (99, ?, ?, 'work_order', 'business', 1.0, ?, ?, "
        "'422 invalid', 2.0)",
        (dead.id, dead.entity_id, len(body), body),
    )
    sizes = con.execute("SELECT class, COUNT(*), SUM(size) FROM records GROUP BY class")
    con.executemany("INSERT INTO totals VALUES (?, ?, ?)", sizes.fetchall())
    con.execute("INSERT INTO cursors VALUES ('sap', 'wm', '[\"20261121\"]', 1.0)")
    con.execute("INSERT INTO counters VALUES ('requeued', 3)")
    con.execute("COMMIT")
    con.close()


async def test_a_v2_outbox_is_upgraded_keeping_records_ids_and_dedupe_state(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    queued = [version("WO1", "A"), reading("meter", 1), version("WO2", "A")]
    write_v2_file(path, queued, dead=version("WO9", "X"))
    async with Outbox(path) as box:
        assert box.recovered_from is None
        leased = await box.lease(10, 1 << 20)
        # Every queued record is delivered as it was: same seq order, id and body.
        assert [x.id for x in leased] == [r.id for r in queued]
        for rec, got in zip(queued, leased, strict=True):
            assert got.body == rec.to_json()[:-1] + f',"seq":{got.seq}}}'.encode()
        assert [d["id"] for d in await box.dead_letters()] == [version("WO9", "X").id]
        assert await box.cursor("sap", "wm") == ["20261121"]
        stats = await box.stats()
        assert stats.counters["requeued"] == 3
        assert stats.rows == {"business": 2, "reading": 1}
        # The dedupe state came along: re-reading WO1's content appends nothing ...
        assert (await box.append([version("WO1", "A")])).unchanged == 1
        # ... and its next versions chain from the new epoch, never to a v2 id.
        b = await box.append([version("WO1", "B"), version("WO1", "A")])
        assert b.ids == expected_ids(box.epoch, list("BA"))
        assert queued[0].id not in b.ids
        epoch = box.epoch
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        assert con.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0] == epoch
        rows = con.execute("SELECT entity, last_id FROM entity_versions ORDER BY entity")
        assert dict(rows.fetchall()) == {
            "test:work_order:WO1": b.ids[1],
            "test:work_order:WO2": None,
        }
    finally:
        con.close()


async def test_a_failed_upgrade_leaves_the_v2_file_as_it_was(tmp_path: Path) -> None:
    """The upgrade is one transaction: when it fails, nothing changed, and the file is not
    mistaken for a corrupt one (moving it aside would leave its records behind)."""
    path = tmp_path / "outbox.db"
    queued = [version("WO1", "A")]
    write_v2_file(path, queued, dead=version("WO9", "X"))
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("CREATE TABLE meta (unexpected INTEGER)")  # the epoch cannot be stored
    con.close()
    with pytest.raises(RuntimeError, match="version 2 to 3"):
        await Outbox(path).open()
    assert not list(tmp_path.glob("outbox.db.corrupt-*"))
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 2
        columns = [r[1] for r in con.execute("PRAGMA table_info(entity_versions)")]
        assert columns == ["entity", "digest"]
        assert con.execute("SELECT id FROM records").fetchall() == [(queued[0].id,)]
    finally:
        con.close()


async def test_cursor_and_records_still_commit_together(tmp_path: Path) -> None:
    """Chaining runs in the same transaction as the cursor: both or neither."""
    async with Outbox(tmp_path / "o.db") as box:
        await box.append([version("WO1", "A")], Cursor("s", "k", 1))
        result = await box.append([version("WO1", "A")], Cursor("s", "k", 2))
        assert result.unchanged == 1
        assert await box.cursor("s", "k") == 2  # an unchanged re-read still moves the cursor


async def test_the_documented_downgrade_gives_a_v2_file(tmp_path: Path) -> None:
    """docs/outbox.md's way back to schema 2, run on a v3 file: the v2 schema, with what
    was queued kept (and an upgrade again later starts a new chain)."""
    path = tmp_path / "outbox.db"
    async with Outbox(path) as box:
        epoch = box.epoch
        queued = await box.append([version("WO1", "A"), version("WO1", "B")])
    con = sqlite3.connect(path, isolation_level=None)
    con.executescript(
        "ALTER TABLE entity_versions DROP COLUMN last_id; DROP TABLE meta; PRAGMA user_version=2;"
    )
    v2 = sqlite3.connect(":memory:")
    v2.executescript(V2_SCHEMA)
    for table in ("records", "entity_versions", "dead_letters", "cursors", "counters"):
        want = [r[1:3] for r in v2.execute(f"PRAGMA table_info({table})")]
        assert [r[1:3] for r in con.execute(f"PRAGMA table_info({table})")] == want
    assert [i for (i,) in con.execute("SELECT id FROM records ORDER BY seq")] == queued.ids
    con.close()
    async with Outbox(path) as box:
        assert box.epoch != epoch
        assert [x.id for x in await box.lease(10, 1 << 20)] == queued.ids
        assert (await box.append([version("WO1", "B")])).unchanged == 1
