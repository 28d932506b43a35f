"""Content reconciliation against SAP-shaped tables in real PostgreSQL and MariaDB.

Each change class here is one no change date shows (so no incremental feed sees it): one
reconciliation pass must send it, log it as a drift naming the fields, and count it.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import sqlite3
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import delete, update
from structlog.testing import capture_logs

from agent.api import AgentCollector
from agent.forwarder import Forwarder
from agent.outbox import Cursor, Outbox, OutboxWriteError
from agent.receiver import running_receiver
from agent.sources.sql import SqlSource, keyset
from tests.helpers.waiting import wait_for
from tests.sql.conftest import Backend, latest, make_source, outbox_records, sql_config
from tests.sql.sapdb import SapDb
from tests.upstream_support import TOKEN, make_settings

BERLIN = ZoneInfo("Europe/Berlin")
ORDERS = [f"{4100000 + i:012d}" for i in range(7)]
RECENT = "000004999999"


def day(offset: int = 0) -> str:
    return (datetime.now(BERLIN) + timedelta(days=offset)).strftime("%Y%m%d")


async def orders(sap: SapDb, keys: list[str] = ORDERS, **extra: Any) -> None:
    """Orders changed weeks ago, and one changed today: the feeds' watermark (and its
    overlap of a day) is past the old ones, so only reconciliation reads them again."""
    for i, key in enumerate(keys):
        await sap.order(key, ktext=f"Order {i}", aedat=day(-20), erdat=day(-20), **extra)
    await sap.order(RECENT, ktext="Recent", aedat=day(), erdat=day(-20))


def drifts(logs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["key"]: e for e in logs if e["event"] == "sql_reconcile_drift"}


async def test_changes_no_feed_sees_are_sent_by_one_pass(
    backend: Backend, sap: SapDb, outbox: Outbox
):
    await orders(sap, tplnr="PLANT-A")
    config = sql_config(backend, include=["work_orders"], chunk_size=3)
    source = make_source(config)
    aufk, afih, afko, iloa = (sap.table(t) for t in ("AUFK", "AFIH", "AFKO", "ILOA"))
    try:
        await source.sync_once(outbox, reconcile=True)  # the baseline
        # Edits a script makes, none touching AEDAT or writing change documents:
        await sap.execute(update(aufk).where(aufk.c.AUFNR == ORDERS[0]).values(KTEXT="Script"))
        await sap.execute(
            update(afih).where(afih.c.AUFNR == ORDERS[1]).values(EQUNR="000000000010000009")
        )
        await sap.execute(
            update(iloa).where(iloa.c.ILOAN == f"L{ORDERS[2][-10:]}").values(TPLNR="PLANT-B")
        )
        await sap.execute(update(afko).where(afko.c.AUFNR == ORDERS[3]).values(GSTRP="20270105"))
        await sap.execute(delete(aufk).where(aufk.c.AUFNR == ORDERS[4]))
        await sap.order("000004199999", ktext="Backdated", aedat=day(-10), erdat=day(-10))
        await sap.execute(  # deletion flag set without AEDAT (a mass-update report)
            update(aufk).where(aufk.c.AUFNR == ORDERS[5]).values(LOEKZ="X")
        )
        status = await source.sync_once(outbox)
        assert status["work_orders"]["progress"]["stored"] == 0, "no feed sees any of them"
        with capture_logs() as logs:
            await source.entities["work_orders"].reconcile(outbox)
    finally:
        await source.aclose()
    got = latest(outbox, "work_order")
    assert got[ORDERS[0]]["data"]["title"] == "Script"
    assert got[ORDERS[1]]["data"]["asset_remote_id"] == "000000000010000009"
    assert got[ORDERS[2]]["data"]["location_remote_id"] == "PLANT-B"
    assert got[ORDERS[3]]["data"]["planned_start"] == "2027-01-05T00:00:00.000Z"
    assert got[ORDERS[4]]["op"] == "delete"
    assert got[ORDERS[4]]["data"] == {"deleted": True, "reason": "not_found_in_source"}
    assert got["000004199999"]["data"]["title"] == "Backdated"
    assert got[ORDERS[5]]["op"] == "delete"
    assert got[ORDERS[6]]["seq"] < got[ORDERS[0]]["seq"], "the unchanged order is not re-sent"
    seen = drifts(logs)
    assert sorted(seen) == sorted([*ORDERS[:4], "000004199999", ORDERS[5]])
    assert {(e["log_level"], e["source"], e["entity"]) for e in seen.values()} == {
        ("warning", "sap-prd", "work_orders")
    }, "each drift is a warning naming the entity (and the key and fields, below)"
    assert seen[ORDERS[0]]["fields"] == ["data.title", "remote_data"]
    assert seen[ORDERS[1]]["fields"] == ["data.asset_remote_id", "remote_data"]
    assert seen[ORDERS[2]]["fields"] == ["data.location_remote_id", "remote_data"]
    assert seen[ORDERS[3]]["fields"] == ["data.planned_start", "remote_data"]
    assert seen[ORDERS[5]]["fields"] == ["op", "remote_data"]
    assert seen["000004199999"]["reason"] == "created"
    last = source.sync_status()["work_orders"]["reconcile"]["last"]
    assert (last["rows"], last["drifts"], last["created"], last["deletes"]) == (8, 6, 1, 1)
    assert source.sync_status()["work_orders"]["reconcile"]["last_reconcile_at"] is not None


async def test_a_change_the_feeds_will_send_is_no_drift(
    backend: Backend, sap: SapDb, outbox: Outbox
):
    """Reconciliation reads a row changed since the last sync: the feeds run first."""
    await orders(sap)
    source = make_source(sql_config(backend, include=["work_orders"]))
    aufk = sap.table("AUFK")
    try:
        await source.sync_once(outbox, reconcile=True)
        await sap.execute(
            update(aufk).where(aufk.c.AUFNR == ORDERS[0]).values(KTEXT="Edited", AEDAT=day())
        )
        with capture_logs() as logs:
            await source.entities["work_orders"].reconcile(outbox)
    finally:
        await source.aclose()
    assert latest(outbox, "work_order")[ORDERS[0]]["data"]["title"] == "Edited"
    assert drifts(logs) == {}
    assert source.sync_status()["work_orders"]["reconcile"]["last"]["drifts"] == 0


async def test_created_and_hard_deleted_with_a_restart_between(
    backend: Backend, sap: SapDb, tmp_path: Path
):
    """The documented limitation is gone: a row created and synced, then hard-deleted
    while the agent is stopped, reaches the upstream as a delete after the restart (the
    key set is in the outbox; it was a temporary file a restart lost)."""
    await orders(sap, ORDERS[:2])
    config = sql_config(backend, include=["work_orders"])
    aufk = sap.table("AUFK")
    short = "000004188888"
    async with running_receiver(tmp_path / "rx.db", TOKEN) as rx:
        upstream = make_settings(tmp_path, rx.url).upstream

        async def agent(work: Any) -> None:
            """One agent process: its outbox, forwarder and source, stopped at the end."""
            async with Outbox(tmp_path / "outbox.db") as box:
                forwarder = Forwarder(box, upstream, "test-agent")
                await forwarder.start()
                source = make_source(config)
                try:
                    await work(source, box)

                    async def delivered() -> bool:
                        return sum((await box.stats()).rows.values()) == 0

                    await wait_for(delivered, what="the outbox delivered")
                finally:
                    await source.aclose()
                    await forwarder.stop()

        async def first(source: SqlSource, box: Outbox) -> None:
            await source.sync_once(box, reconcile=True)
            await sap.order(short, ktext="Short-lived", aedat=day())
            await source.sync_once(box)

        await agent(first)
        assert rx.store.latest("sap-prd", "work_order")[short]["op"] == "upsert"
        await sap.execute(delete(aufk).where(aufk.c.AUFNR == short))  # agent stopped
        await agent(lambda source, box: source.sync_once(box, reconcile=True))
        got = rx.store.latest("sap-prd", "work_order")
    assert got[short]["op"] == "delete"
    assert got[short]["data"] == {"deleted": True, "reason": "not_found_in_source"}
    assert {k for k, v in got.items() if v["op"] == "delete"} == {short}


async def test_a_dead_lettered_version_is_sent_again(backend: Backend, sap: SapDb, outbox: Outbox):
    """Compared with what was delivered, not what was appended: a full sync repairs it."""
    await orders(sap, ORDERS[:2])
    source = make_source(sql_config(backend, include=["work_orders"]))
    aufk = sap.table("AUFK")
    try:
        await source.sync_once(outbox, reconcile=True)
        await sap.execute(
            update(aufk).where(aufk.c.AUFNR == ORDERS[0]).values(KTEXT="Rejected", AEDAT=day())
        )
        await source.sync_once(outbox)
        leased = await outbox.lease(100, 1 << 30)
        refused = [x for x in leased if orjson.loads(x.body)["remote_id"] == ORDERS[0]][-1]
        await outbox.ack([x.seq for x in leased if x is not refused])
        await outbox.reject([(refused.seq, "upstream 422: invalid title")])
        assert [r["remote_id"] for r in outbox_records(outbox)] == []
        await source.sync_once(outbox)  # the overlap re-read: dedupe, nothing new
        assert outbox_records(outbox) == []
        status = await source.sync_once(outbox, full=True)
        again = outbox_records(outbox)
        assert [(r["remote_id"], r["data"]["title"]) for r in again] == [(ORDERS[0], "Rejected")]
        assert status["work_orders"]["reconcile"]["last"]["resent"] == 1
        await outbox.ack([x.seq for x in await outbox.lease(100, 1 << 30)])
        await source.sync_once(outbox, reconcile=True)  # delivered now: nothing owed
        assert outbox_records(outbox) == []
    finally:
        await source.aclose()


async def test_a_pass_is_spread_and_resumes_after_a_restart(
    backend: Backend, sap: SapDb, outbox: Outbox
):
    keys = [f"{4200000 + i:012d}" for i in range(10)]
    await orders(sap, keys)
    config = sql_config(backend, include=["work_orders"], chunk_size=3, reconcile_interval="1d")
    aufk = sap.table("AUFK")
    first = make_source(config)
    try:
        await first.sync_once(outbox, reconcile=True)  # baseline
        rec = first.entities["work_orders"].reconciler
        assert rec.next_step_at() > rec.last.started_at + 86000, "next pass in a day"
        await rec.step(outbox)  # a new pass: chunk 1 of 4
        await rec.step(outbox)
        assert rec.status()["state"] == "in_progress"
        assert rec.current.rows == 6
        # 11 keys, 3 per chunk: 2 more chunks and the delete page share the rest of 90%
        # of the day.
        gap = rec.next_step_at() - rec._last_step_at
        expected = (rec.current.started_at + 0.9 * 86400 - rec._last_step_at) / 3
        assert gap == pytest.approx(expected)
        assert gap > 3600
    finally:
        await first.aclose()
    await sap.execute(delete(aufk).where(aufk.c.AUFNR == keys[1]))  # already scanned
    await sap.execute(delete(aufk).where(aufk.c.AUFNR == keys[8]))  # not yet
    second = make_source(config)
    try:
        await second.sync_once(outbox, entities=[])
        rec = second.entities["work_orders"].reconciler
        assert (rec.phase, rec.after, rec.current.rows) == ("scan", (keys[5],), 6)
        steps = 0
        while not await rec.step(outbox):
            steps += 1
        assert steps == 2  # two chunks, then the delete page ends the pass
    finally:
        await second.aclose()
    deletes = [r["remote_id"] for r in outbox_records(outbox) if r["op"] == "delete"]
    # keys[1] was seen by this pass before it was deleted: the next pass deletes it.
    assert deletes == [keys[8]]
    assert rec.last is not None
    assert (rec.last.rows, rec.last.deletes) == (10, 1)  # 11 orders, 1 gone before its turn


async def test_rows_older_than_the_initial_window_stay_out(
    backend: Backend, sap: SapDb, outbox: Outbox
):
    await sap.order("000004300001", aedat=day(-200), erdat=day(-200))
    await sap.order("000004300002", aedat=day(-5), erdat=day(-5))
    source = make_source(sql_config(backend, include=["work_orders"], initial_window="90d"))
    try:
        await source.sync_once(outbox, reconcile=True)
        await sap.order("000004300003", aedat=day(-300), erdat=day(-300))
        await source.entities["work_orders"].reconcile(outbox)
    finally:
        await source.aclose()
    assert sorted(latest(outbox, "work_order")) == ["000004300002"]
    last = source.entities["work_orders"].reconciler.last
    assert last is not None
    assert last.out_of_window == 2


async def test_upgrade_from_the_key_list_of_an_older_agent(
    backend: Backend, sap: SapDb, outbox: Outbox
):
    """Older agents kept the reconciled keys in one cursor: a key deleted since is found."""
    await orders(sap, ORDERS[:3])
    old_keys = keyset.pack(sorted([*ORDERS[:3], "000004000777"]))
    synced = {  # the feeds are past these orders: only reconciliation reads them again
        "changes": {"m": day(), "k": None},
        "status": {"m": day() + "000000", "k": None},
    }
    await outbox.append(
        (),
        cursor=[
            Cursor("sap-prd", "keys:work_orders", old_keys),
            Cursor("sap-prd", "watermark:work_orders", {"feeds": synced, "last_reconcile_at": 1e9}),
        ],
    )
    source = make_source(sql_config(backend, include=["work_orders"]))
    try:
        await source.sync_once(outbox, entities=[])
        rec = source.entities["work_orders"].reconciler
        assert rec.last is not None
        assert rec.last.started_at == 1e9, "the old last_reconcile_at schedules the next pass"
        assert await outbox.cursor("sap-prd", "keys:work_orders") is None, "read once"
        await source.sync_once(outbox, reconcile=True)
    finally:
        await source.aclose()
    got = latest(outbox, "work_order")
    assert got["000004000777"]["op"] == "delete"
    assert rec.last.baseline == 3, "seeded keys have no digest: a baseline, not drifts"


async def test_key_set_rows_stay_small(backend: Backend, sap: SapDb, outbox: Outbox):
    """What the outbox keeps per key (documented in docs/sql-sources.md)."""
    await orders(sap)
    source = make_source(sql_config(backend, include=["work_orders"]))
    try:
        await source.sync_once(outbox, reconcile=True)
    finally:
        await source.aclose()
    con = sqlite3.connect(outbox.path)
    try:
        rows = con.execute("SELECT key, mark, live, digest, fields FROM source_keys").fetchall()
    finally:
        con.close()
    assert sorted(r[0] for r in rows) == [*ORDERS, RECENT]
    assert all(r[2] == 1 and isinstance(r[3], int) for r in rows)
    names = source.entities["work_orders"].reconciler.layout.names
    assert names[-1] == "remote_data"
    assert {len(r[4]) for r in rows} == {2 + 2 * len(names)}, "tag + 2 bytes per field"
    assert 2 + 2 * len(names) <= 32


async def test_status_and_metrics(pg: Backend, outbox: Outbox):
    sap = SapDb(pg.engine, pg.schema)
    await sap.create()
    await orders(sap, ORDERS[:3])
    source = make_source(sql_config(pg, include=["work_orders"]))
    aufk = sap.table("AUFK")
    try:
        await source.sync_once(outbox, reconcile=True)
        await sap.execute(update(aufk).where(aufk.c.AUFNR == ORDERS[0]).values(KTEXT="Moved"))
        await sap.execute(delete(aufk).where(aufk.c.AUFNR == ORDERS[1]))
        await source.entities["work_orders"].reconcile(outbox)
    finally:
        await source.aclose()
    rec = source.status()["entities"]["work_orders"]["reconcile"]
    assert rec["state"] == "idle"
    assert rec["totals"] == {"rows": 4 + 3, "drifts": 1, "deletes": 1}
    assert (rec["last"]["rows"], rec["last"]["drifts"], rec["last"]["deletes"]) == (3, 1, 1)
    collector = AgentCollector(None)  # type: ignore[arg-type]
    collector.snapshot = {"sources": {"sap-prd": source.status()}}
    text = generate_latest(_registry(collector)).decode()
    labels = '{entity="work_orders",source="sap-prd"}'
    assert f"edge_agent_sql_reconcile_rows_total{labels} 7.0" in text
    assert f"edge_agent_sql_reconcile_drifts_total{labels} 1.0" in text
    assert f"edge_agent_sql_reconcile_deletes_total{labels} 1.0" in text
    assert f"edge_agent_sql_last_reconcile_timestamp_seconds{labels}" in text


def _registry(collector: AgentCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


async def test_a_customer_field_change_is_a_drift(backend: Backend, outbox: Outbox):
    """A Z-field appended to AUFK (CI_AUFK), mapped as a custom field: read with the
    header table, and its change, which no change date shows, found by reconciliation."""
    sap = SapDb(backend.engine, backend.schema, extra={"AUFK": ("ZZCONTRACT",)})
    await sap.create()
    await orders(sap, ORDERS[:2])
    aufk = sap.table("AUFK")
    await sap.execute(update(aufk).values(ZZCONTRACT="C-1"))
    mappings = {"work_orders": {"custom": {"zz_contract": "ZZCONTRACT"}}}
    source = make_source(sql_config(backend, include=["work_orders"], mappings=mappings))
    try:
        await source.sync_once(outbox, reconcile=True)
        assert latest(outbox, "work_order")[ORDERS[0]]["custom"] == {"zz_contract": "C-1"}
        await sap.execute(update(aufk).where(aufk.c.AUFNR == ORDERS[0]).values(ZZCONTRACT="C-2"))
        with capture_logs() as logs:
            await source.sync_once(outbox, reconcile=True)
    finally:
        await source.aclose()
    assert latest(outbox, "work_order")[ORDERS[0]]["custom"] == {"zz_contract": "C-2"}
    assert drifts(logs)[ORDERS[0]]["fields"] == ["custom.zz_contract", "remote_data"]


class FailingOnce:
    """The real outbox, but the n-th append fails without committing (disk full)."""

    def __init__(self, box: Outbox, at: int) -> None:
        self.box, self.at, self.calls = box, at, 0

    async def append(self, records: Any, cursor: Any = None, **kw: Any) -> Any:
        self.calls += 1
        if self.calls == self.at:
            raise OutboxWriteError("outbox commit failed: database or disk is full")
        return await self.box.append(records, cursor, **kw)

    async def cursor(self, source: str, key: str) -> Any:
        return await self.box.cursor(source, key)

    def key_set(self, source: str, name: str) -> Any:
        return self.box.key_set(source, name)


@pytest.mark.parametrize("pipelined", [False, True], ids=["scheduled", "without_pauses"])
async def test_a_failed_step_is_done_again_not_skipped(
    backend: Backend, sap: SapDb, outbox: Outbox, pipelined: bool
):
    """A step whose commit failed is read again: its keys are not taken for deleted. And
    the query in flight then (the next chunk's) is let finish, not cancelled: a query
    cancelled half-way leaks its connection (a ResourceWarning when it is collected)."""
    keys = [f"{4400000 + i:012d}" for i in range(10)]
    await orders(sap, keys)
    config = sql_config(backend, include=["work_orders"], chunk_size=3, reconcile_interval="1d")
    source = make_source(config)
    try:
        await source.sync_once(outbox, reconcile=True)  # baseline
        rec = source.entities["work_orders"].reconciler
        failing = FailingOnce(outbox, at=2)
        if pipelined:
            with pytest.raises(OutboxWriteError):
                await rec.run_pass(failing)
            await rec.run_pass(outbox, fresh=False)  # what the next sync --full resumes
        else:
            await rec.step(failing)
            with pytest.raises(OutboxWriteError):
                await rec.step(failing)
            while not await rec.step(outbox):
                pass
    finally:
        await source.aclose()
    assert rec.last is not None
    assert (rec.last.rows, rec.last.deletes) == (11, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        del source, rec
        gc.collect()
    assert [str(w.message) for w in caught] == [], "no connection left unclosed"
    assert [r["remote_id"] for r in outbox_records(outbox) if r["op"] == "delete"] == []


async def test_the_schedule_takes_a_pass_one_chunk_at_a_time(pg: Backend, outbox: Outbox):
    """A running source reconciles in steps of one chunk, and waits between them (the
    trickle the database sees), rather than in one go."""
    sap = SapDb(pg.engine, pg.schema)
    await sap.create()
    keys = [f"{4500000 + i:012d}" for i in range(10)]
    await orders(sap, keys)  # 11 orders, chunks of 3: 4 scan steps and the delete page
    await sap.execute(delete(sap.table("AUFK")).where(sap.table("AUFK").c.AUFNR == keys[3]))
    config = sql_config(
        pg, include=["work_orders"], chunk_size=3, interval="1h", reconcile_interval="3s"
    )
    source = make_source(config)
    rec = source.entities["work_orders"].reconciler
    events: list[tuple[str, Any]] = []
    real_step, real_wait = rec.step, source._wait

    async def step(out: Any, **kw: Any) -> bool:
        events.append(("step", rec.current.rows))
        return await real_step(out, **kw)

    async def wait(name: str, at: float) -> None:
        events.append(("wait", at - time.time()))
        await real_wait(name, at)

    rec.step = step  # type: ignore[method-assign]
    source._wait = wait  # type: ignore[method-assign]
    task = asyncio.create_task(source.run(outbox))
    try:
        await wait_for(lambda: rec.last is not None, what="a reconciliation pass", timeout=60)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    steps = [i for i, (kind, _) in enumerate(events) if kind == "step"]
    assert [events[i][1] for i in steps] == [0, 3, 6, 9, 10], "one chunk per step"
    for before, after in itertools.pairwise(steps):
        waits = [events[i][1] for i in range(before + 1, after) if events[i][0] == "wait"]
        assert waits, f"no wait between steps: {events}"
        assert max(waits) > 0, f"no pause between steps: {events}"
    assert rec.last is not None
    assert (rec.last.rows, rec.last.deletes) == (10, 0)
