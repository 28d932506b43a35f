"""The durable outbox: append/lease/ack, cursors, dead letters, budget, retention, recovery."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import orjson
import pytest

import agent.outbox as outbox_module
from agent.errors import OutboxWriteError
from agent.outbox import Cursor, Outbox, Quarantined
from agent.records import EntityType, Record, SourceRef
from tests.helpers.waiting import wait_for
from tests.outbox_helpers import reading, stored_json, work_order


@pytest.fixture
async def box(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with Outbox(tmp_path / "outbox.db") as ob:
        yield ob


async def waiting_for_budget(box: Outbox) -> bool:
    """True while an append is held back by the byte budget (what status reports)."""
    return (await box.stats()).blocked_appends == 1


async def on_writer(box: Outbox, sql: str) -> None:
    """Run a statement on the outbox's writer connection, in its thread."""
    assert box._wcon is not None
    await asyncio.get_running_loop().run_in_executor(box._executor, box._wcon.execute, sql)


def ids(leased: list) -> list[str]:  # type: ignore[type-arg]
    return [x.id for x in leased]


async def test_append_lease_ack_in_order(box: Outbox) -> None:
    recs = [work_order(f"WO{i}") for i in range(5)]
    result = await box.append(recs)
    assert result.stored == 5
    leased = await box.lease(10, 10**6)
    assert ids(leased) == result.ids
    body = orjson.loads(leased[0].body)
    assert body["seq"] == leased[0].seq
    assert body["id"] == result.ids[0]
    assert body["data"] == recs[0].data
    assert await box.ack([x.seq for x in leased[:3]]) == 3
    stats = await box.stats()
    assert stats.rows["business"] == 2
    assert await box.lease(10, 10**6) == []  # the rest is still in flight
    box.release(x.seq for x in leased[3:])
    assert await box.lease(10, 10**6) == leased[3:]


async def test_large_groups_are_split_and_keep_order_and_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group over the statement size limit goes in as several statements, in order."""
    monkeypatch.setattr(outbox_module, "_INSERT_MANY_BYTES", 2000)
    recs = [work_order(f"WO{i}", pad=i * 37) for i in range(40)]  # 200 B to 1.7 KB each
    async with Outbox(tmp_path / "outbox.db") as box:
        result = await box.append(recs)
        assert result.stored == 40
        leased = await box.lease(100, 10**8)
        stats = await box.stats()
    assert ids(leased) == result.ids
    assert [x.seq for x in leased] == sorted(x.seq for x in leased)
    for rec, rid, got in zip(recs, result.ids, leased, strict=True):
        body = orjson.loads(got.body)
        del body["seq"]
        assert orjson.dumps(body, option=orjson.OPT_SORT_KEYS) == stored_json(rec, rid)
    assert stats.rows["business"] == 40
    assert stats.bytes["business"] == sum(len(r.to_json()) for r in recs)


async def test_lease_respects_count_and_bytes_but_always_gives_one(box: Outbox) -> None:
    recs = [work_order(f"WO{i}", pad=1000) for i in range(10)]
    size = len(recs[0].to_json()) + 12  # the lease adds ',"seq":N'
    await box.append(recs)
    assert len(await box.lease(3, 10**6)) == 3
    box.release(range(100))
    one = await box.lease(10, 10)  # smaller than one record: still one, or nothing moves
    assert len(one) == 1
    box.release([one[0].seq])
    assert len(await box.lease(10, 2 * size + size // 2)) == 2


async def test_lease_never_hands_out_a_later_version_while_an_earlier_is_in_flight(
    box: Outbox,
) -> None:
    await box.append([work_order("A", 1), work_order("B", 1)])
    await box.append([work_order("A", 2), work_order("C", 1)])
    first = await box.lease(1, 10**6)  # A1 in flight
    assert [orjson.loads(x.body)["data"]["version"] for x in first] == [1]
    second = await box.lease(10, 10**6)
    keys = [orjson.loads(x.body)["remote_id"] for x in second]
    assert keys == ["B", "C"]  # A2 waits for A1
    await box.ack([first[0].seq])
    third = await box.lease(10, 10**6)
    assert [orjson.loads(x.body)["data"]["version"] for x in third] == [2]


async def test_cursor_commits_with_records(box: Outbox) -> None:
    assert await box.cursor("sap", "watermark:work_order") is None
    await box.append([work_order("1")], Cursor("sap", "watermark:work_order", ["20261121", "1"]))
    assert await box.cursor("sap", "watermark:work_order") == ["20261121", "1"]
    await box.append([], Cursor("sap", "watermark:work_order", ["20261122", "9"]))
    assert await box.cursors("sap") == {"watermark:work_order": ["20261122", "9"]}


async def test_failed_commit_stores_neither_records_nor_cursor(tmp_path: Path) -> None:
    """Disk full (simulated with max_page_count, SQLite's real SQLITE_FULL path)."""
    async with Outbox(tmp_path / "o.db") as box:
        await box.append([work_order("before")], Cursor("s", "k", 1))
        await on_writer(box, "PRAGMA max_page_count=1")  # every further page allocation fails
        big = [work_order(f"big{i}", pad=4000) for i in range(50)]
        with pytest.raises(OutboxWriteError, match="full"):
            await box.append(big, Cursor("s", "k", 2))
        assert await box.cursor("s", "k") == 1
        stats = await box.stats()
        assert stats.rows["business"] == 1
        assert stats.write_errors == 1
        assert "full" in (stats.last_write_error or "")
        assert stats.write_failing
        # space returns: the same append now succeeds, the outbox kept running
        await on_writer(box, "PRAGMA max_page_count=1073741823")
        assert (await box.append(big, Cursor("s", "k", 2))).stored == 50
        assert await box.cursor("s", "k") == 2
        stats = await box.stats()
        assert not stats.write_failing, "a good commit clears the failing state"
        assert (stats.write_errors, stats.as_dict()["write_failing"]) == (1, False)


async def test_dedupe_skips_unchanged_versions_only(box: Outbox) -> None:
    v1 = [work_order(f"WO{i}", 1) for i in range(4)]
    assert (await box.append(v1)).stored == 4
    again = await box.append([work_order(f"WO{i}", 1) for i in range(4)])
    assert (again.stored, again.unchanged) == (0, 4)
    changed = await box.append([work_order("WO0", 2), work_order("WO1", 1)])
    assert (changed.stored, changed.unchanged) == (1, 1)
    back = await box.append([work_order("WO0", 1)])  # reverted: a new version
    assert back.stored == 1


async def test_dedupe_state_survives_reopen_and_is_per_source(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "outbox.db") as box:
        await box.append([work_order("WO1", 1), work_order("WO2", 1)])
    async with Outbox(tmp_path / "outbox.db") as box:
        again = await box.append([work_order("WO1", 1), work_order("WO2", 2)])
        assert (again.stored, again.unchanged) == (1, 1)
        # Same remote id and content from another source: another entity, stored.
        other = Record.entity(
            SourceRef("other", "test", "site-1"), EntityType.WORK_ORDER, "WO1",
            work_order("WO1", 1).data,
        )  # fmt: skip
        assert (await box.append([other])).stored == 1


async def test_schema_v1_file_is_migrated_keeping_records_and_cursors(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with Outbox(path) as box:
        first = await box.append([work_order("WO1", 1)], Cursor("s", "k", 7))
    # Turn the file back into what a v1 agent left: the old dedupe table, version 1.
    con = sqlite3.connect(path, isolation_level=None)
    con.executescript(
        "DROP TABLE entity_versions; "
        "CREATE TABLE entity_hashes (entity_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL) "
        "WITHOUT ROWID; INSERT INTO entity_hashes VALUES ('e', 'sha256:00'); "
        "DROP TABLE meta; PRAGMA user_version=1;"
    )
    con.close()
    async with Outbox(path) as box:
        assert await box.cursor("s", "k") == 7
        assert ids(await box.lease(10, 10**6)) == first.ids
        # The v1 hashes are gone (uuids cannot be mapped to names): one re-send, no loss.
        assert (await box.append([work_order("WO1", 1)])).stored == 1
        assert (await box.append([work_order("WO1", 1)])).unchanged == 1
    con = sqlite3.connect(path)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert con.execute("PRAGMA user_version").fetchone()[0] == 3
    con.close()
    assert "entity_hashes" not in tables
    assert "entity_versions" in tables


async def test_reject_then_requeue_restores_original_position(box: Outbox) -> None:
    await box.append([work_order(f"WO{i}") for i in range(3)])
    leased = await box.lease(10, 10**6)
    assert await box.reject([(leased[1].seq, "400 invalid status")]) == 1
    dead = await box.dead_letters()
    assert [(d["seq"], d["reason"]) for d in dead] == [(leased[1].seq, "400 invalid status")]
    await box.ack([leased[0].seq, leased[2].seq])
    assert (await box.stats()).rows["business"] == 0
    assert await box.requeue_dead() == 1
    again = await box.lease(10, 10**6)
    assert [x.seq for x in again] == [leased[1].seq]
    assert again[0].body == leased[1].body
    assert (await box.stats()).dead_letters == 0


async def test_quarantine_is_kept_counted_and_bounded(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db", quarantine_max_rows=3) as box:
        for i in range(5):
            await box.quarantine([Quarantined("mqtt1", "not_json", {"topic": f"t/{i}"}, b"\xff")])
        rows = await box.quarantined()
        assert [r["context"]["topic"] for r in rows] == ["t/4", "t/3", "t/2"]
        assert rows[0]["payload"] == "\\xff"
        counters = (await box.stats()).counters
        assert counters["quarantined:mqtt1:not_json"] == 5
        assert counters["quarantine_evicted"] == 2


async def test_business_records_block_when_over_budget_until_acked(tmp_path: Path) -> None:
    size = len(work_order("x", pad=1000).to_json())
    async with Outbox(tmp_path / "o.db", max_bytes=3 * size + 100, when_full="drop_oldest") as box:
        await box.append([work_order(f"WO{i}", pad=1000) for i in range(3)])
        blocked = asyncio.create_task(box.append([work_order("late", pad=1000)]))
        await wait_for(lambda: waiting_for_budget(box), what="append waits for budget")
        assert not blocked.done()
        leased = await box.lease(1, 10**6)
        await box.ack([leased[0].seq])
        assert (await asyncio.wait_for(blocked, 5)).stored == 1
        assert (await box.stats()).counters.get("dropped:over_budget", 0) == 0


async def test_readings_block_too_unless_drop_oldest(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db", max_bytes=3000, when_full="block") as box:
        await box.append([reading("p", i, pad=500) for i in range(4)])
        blocked = asyncio.create_task(box.append([reading("p", 99, pad=500)]))
        await wait_for(lambda: waiting_for_budget(box), what="append waits for budget")
        assert not blocked.done()
        assert (await box.stats()).counters.get("dropped:over_budget", 0) == 0
        blocked.cancel()


async def test_drop_oldest_drops_readings_first_and_counts_exactly(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db", max_bytes=6000, when_full="drop_oldest") as box:
        await box.append([work_order("keep", pad=1000)])
        for n in range(40):
            await box.append([reading("meter", n, pad=200)])
        stats = await box.stats()
        dropped = stats.counters["dropped:over_budget"]
        assert stats.rows["reading"] + dropped == 40
        assert stats.rows["business"] == 1
        assert sum(stats.bytes.values()) <= 6000
        left = await box.lease(100, 10**7)
        readings = [orjson.loads(x.body) for x in left if x.entity_type == "meter_reading"]
        values = [r["data"]["value"] for r in readings]
        assert values == [n * 0.5 for n in range(dropped, 40)]  # the oldest went first


async def test_business_append_makes_room_by_dropping_readings(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db", max_bytes=5000, when_full="drop_oldest") as box:
        await box.append([reading("m", n, pad=800) for n in range(4)])
        result = await asyncio.wait_for(box.append([work_order("WO", pad=2000)]), 5)
        assert result.stored == 1
        stats = await box.stats()
        assert stats.rows["business"] == 1
        assert stats.counters["dropped:over_budget"] >= 1
        assert stats.rows["reading"] + stats.counters["dropped:over_budget"] == 4


async def test_readings_max_age(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db", readings_max_age=60) as box:
        await box.append([reading("m", n) for n in range(5)] + [work_order("WO")])
        assert await box.enforce_max_age(now=time.time() + 30) == 0
        assert await box.enforce_max_age(now=time.time() + 120) == 5
        stats = await box.stats()
        assert stats.rows == {"business": 1, "reading": 0}
        assert stats.counters["dropped:max_age"] == 5


async def test_counters_and_totals_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with Outbox(path, max_bytes=3000, when_full="drop_oldest") as box:
        for n in range(20):
            await box.append([reading("m", n, pad=300)])
        await box.quarantine([Quarantined("s", "bad", {})])
        before = await box.stats()
    async with Outbox(path, max_bytes=3000, when_full="drop_oldest") as box:
        after = await box.stats()
    assert after.counters == before.counters
    assert after.rows == before.rows
    assert after.bytes == before.bytes


async def test_corrupt_database_is_moved_aside_and_a_fresh_one_started(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not a database" * 100)
    async with Outbox(path) as box:
        assert box.recovered_from is not None
        assert (await box.append([work_order("x")])).stored == 1
        stats = await box.stats()
        assert stats.recovered_from is not None
    moved = list(tmp_path.glob("outbox.db.corrupt-*"))
    assert len(moved) == 1
    assert moved[0].read_bytes().startswith(b"this is not a database")


async def test_damaged_pages_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with Outbox(path) as box:
        await box.append([work_order(f"WO{i}", pad=3000) for i in range(50)])
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    raw = bytearray(path.read_bytes())
    page = 4096
    for off in range(page * 3, min(len(raw), page * 12)):  # scribble over interior pages
        raw[off] = 0x5A
    path.write_bytes(bytes(raw))
    async with Outbox(path) as box:
        assert box.recovered_from is not None
        assert (await box.stats()).rows["business"] == 0


async def test_many_concurrent_producers_all_land_exactly_once(box: Outbox) -> None:
    async def producer(p: int) -> list[str]:
        out = []
        for i in range(40):
            recs = [reading(f"p{p}", i * 5 + k) for k in range(5)]
            await box.append(recs)
            out += [r.id for r in recs]
        return out

    produced = [i for ids_ in await asyncio.gather(*(producer(p) for p in range(50))) for i in ids_]
    stored = [x.id for x in await box.lease(100_000, 10**9)]
    assert len(stored) == len(produced) == 10_000
    assert sorted(stored) == sorted(produced)


async def test_per_producer_order_is_preserved_in_seq(box: Outbox) -> None:
    async def producer(p: int) -> None:
        for v in range(30):
            await box.append([work_order(f"E{p}", v)])

    await asyncio.gather(*(producer(p) for p in range(10)))
    rows = (
        sqlite3.connect(box.path)
        .execute("SELECT entity_id, body FROM records ORDER BY seq")
        .fetchall()
    )
    by_entity: dict[str, list[int]] = {}
    for eid, body in rows:
        by_entity.setdefault(eid, []).append(orjson.loads(body)["data"]["version"])
    assert all(v == list(range(30)) for v in by_entity.values())
