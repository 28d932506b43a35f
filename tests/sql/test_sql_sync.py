"""Sync behaviour: restarts, scheduling, on-demand syncs and a randomized mutation run."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import delete, select, update

from agent.outbox import Outbox
from agent.sources.sql import SqlSource
from agent.sources.sql.sync import SyncState
from tests.helpers.outputs import PowerCut, TestOutput
from tests.helpers.waiting import wait_for
from tests.sql.conftest import Backend, latest, make_source, outbox_records, sql_config
from tests.sql.sapdb import SapDb

BERLIN = ZoneInfo("Europe/Berlin")


def sap_today() -> str:
    return datetime.now(BERLIN).strftime("%Y%m%d")


@pytest.mark.parametrize("after_commit", [False, True])
async def test_restart_mid_initial_sync_resumes_without_gaps(
    backend: Backend, sap: SapDb, outbox: Outbox, after_commit: bool
):
    keys = [f"{5000000 + i:012d}" for i in range(13)]
    for i, key in enumerate(keys):
        await sap.order(key, ktext=f"Order {i}", aedat=sap_today())
    config = sql_config(backend, include=["work_orders"], chunk_size=3)
    first = make_source(config)
    try:
        crashing = TestOutput(outbox)
        crashing.fail(PowerCut(), at=3, after_commit=after_commit)
        with pytest.raises(PowerCut):
            await first.sync_once(crashing)
    finally:
        await first.aclose()
    partial = {r["remote_id"] for r in outbox_records(outbox)}
    assert 0 < len(partial) < len(keys)

    second = make_source(config)  # a new process: state comes from the outbox cursors
    try:
        await second.sync_once(outbox)
    finally:
        await second.aclose()
    ids: dict[str, set[str]] = defaultdict(set)
    for rec in outbox_records(outbox):
        ids[rec["remote_id"]].add(rec["id"])
    assert sorted(ids) == keys, "no gaps"
    assert all(len(v) == 1 for v in ids.values()), "re-sends carry equal ids"


async def test_scheduled_and_requested_syncs_and_persisted_state(
    backend: Backend, sap: SapDb, outbox: Outbox
):
    await sap.order("000000000001", ktext="one", aedat=sap_today())
    config = sql_config(backend, include=["work_orders"], interval="1h", reconcile_interval="1h")
    source = make_source(config)
    task = asyncio.create_task(source.run(outbox))
    try:
        status = source.sync_status
        await wait_for(
            lambda: status()["work_orders"]["next_scheduled_at"] is not None, what="a pass"
        )
        assert status()["work_orders"]["status"] == "completed"
        assert source.health().health.state == "ok"
        await sap.order("000000000002", ktext="two", aedat=sap_today())
        assert source.request_sync(["work_orders"], full=True) == ["work_orders"]
        await wait_for(lambda: "000000000002" in latest(outbox, "work_order"), what="manual sync")
        await wait_for(lambda: status()["work_orders"]["status"] == "completed", what="full pass")
        assert status()["work_orders"]["full"] is True
        with pytest.raises(KeyError):
            source.request_sync(["nope"])
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    restarted = make_source(config)
    try:
        await restarted.sync_once(outbox, entities=[])  # loads persisted state only
        assert restarted.sync_status()["work_orders"]["last_successful_sync_at"] is not None
        assert restarted.sync_status()["work_orders"]["last_reconcile_at"] is not None
    finally:
        await restarted.aclose()


class Mutator:
    """Random SAP-like changes to maintenance orders, with an exact model of the result."""

    def __init__(self, sap: SapDb, seed: int) -> None:
        self.sap, self.rng = sap, random.Random(seed)
        self.live: set[str] = set()
        self.next_key = 1
        self.chgnr: dict[str, int] = {}

    async def populate(self, count: int) -> None:
        """Orders last changed days or weeks ago (status changes to them touch only JCDS)."""
        for _ in range(count):
            key = f"{self.next_key:012d}"
            self.next_key += 1
            days = self.rng.randrange(2, 60)
            day = (datetime.now(BERLIN) - timedelta(days=days)).strftime("%Y%m%d")
            await self.sap.order(key, ktext=f"old {key}", erdat=day, aedat=day)
            self.live.add(key)
            self.chgnr[key] = 1

    async def step(self) -> None:
        op = self.rng.choice(["insert", "insert", "edit", "status", "flag", "drop"])
        if op == "insert" or not self.live:
            key = f"{self.next_key:012d}"
            self.next_key += 1
            await self.sap.order(key, ktext=f"new {key}", aedat=sap_today())
            self.live.add(key)
            self.chgnr[key] = 1
            return
        key = self.rng.choice(sorted(self.live))
        aufk = self.sap.table("AUFK")
        if op == "edit":
            text = f"edit {self.rng.randrange(10**6)}"
            await self.sap.execute(
                update(aufk).where(aufk.c.AUFNR == key).values(KTEXT=text, AEDAT=sap_today())
            )
        elif op == "status":
            await self._status(key, self.rng.choice(["I0010", "I0045", "I0046", "I0076"]))
        elif op == "flag":
            await self.sap.execute(
                update(aufk).where(aufk.c.AUFNR == key).values(LOEKZ="X", AEDAT=sap_today())
            )
        else:
            for table in ("AUFK", "AFIH", "AFKO"):
                t = self.sap.table(table)
                await self.sap.execute(delete(t).where(t.c.AUFNR == key))
            self.live.discard(key)

    async def _status(self, key: str, stat: str) -> None:
        objnr = f"OR{key}"
        self.chgnr[key] += 1
        chgnr = f"{self.chgnr[key]:03d}"
        jest = self.sap.table("JEST")
        await self.sap.execute(delete(jest).where(jest.c.OBJNR == objnr, jest.c.STAT == stat))
        await self.sap.insert("JEST", {"OBJNR": objnr, "STAT": stat, "CHGNR": chgnr})
        now = datetime.now(BERLIN)
        await self.sap.insert(
            "JCDS",
            {"OBJNR": objnr, "STAT": stat, "CHGNR": chgnr, "UDATE": now.strftime("%Y%m%d"),
             "UTIME": now.strftime("%H%M%S")},
        )  # fmt: skip

    async def expected(self) -> dict[str, tuple[str, str, list[str]]]:
        """remote_id -> (op, title, sap_status) read back from the database."""
        aufk, jest = self.sap.table("AUFK"), self.sap.table("JEST")
        async with self.sap.engine.connect() as conn:
            orders = (await conn.execute(select(aufk.c.AUFNR, aufk.c.KTEXT, aufk.c.LOEKZ))).all()
            stats = (await conn.execute(select(jest.c.OBJNR, jest.c.STAT))).all()
        codes: dict[str, list[str]] = defaultdict(list)
        for objnr, stat in stats:
            codes[objnr[2:]].append(stat)
        out = {}
        for aufnr, ktext, loekz in orders:
            st = sorted(codes[aufnr])
            op = "delete" if loekz.strip() or "I0076" in st else "upsert"
            out[aufnr] = (op, ktext, st)
        return out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [7, 2026])
async def test_randomized_mutations_converge(
    backend: Backend, sap: SapDb, outbox: Outbox, seed: int
):
    """While syncs run, random inserts/edits/status changes/flags/hard deletes happen.

    After quiescence (one more sync and reconciliation), the newest outbox record of
    every order equals its database state, and orders that vanished end with ``delete``.
    Verified against the outbox records table (the forwarder is a separate component).
    """
    mutator = Mutator(sap, seed)
    await mutator.populate(30)
    config = sql_config(
        backend, include=["work_orders"], chunk_size=4, interval="20ms", reconcile_interval="50ms"
    )
    source = make_source(config)
    task = asyncio.create_task(source.run(outbox))
    try:
        state = source.entities["work_orders"].state
        for step in range(150):
            await mutator.step()
            await asyncio.sleep(0)  # let the sync interleave
            if step % 15 == 14:  # and make sure passes run in the middle of the changes
                await wait_for(_passed_since(state, time.time()), what="a pass")
        quiet = time.time()
        await wait_for(
            lambda: _caught_up(source, quiet), what="a sync and reconcile after quiescence"
        )
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    expected = await mutator.expected()
    got = latest(outbox, "work_order")
    for aufnr, (op, title, st) in expected.items():
        rec = got[aufnr]
        assert rec["op"] == op, aufnr
        assert rec["data"]["title"] == title, aufnr
        assert rec["data"]["sap_status"] == st, aufnr
    for aufnr in set(got) - set(expected):
        assert got[aufnr]["op"] == "delete", f"{aufnr} vanished but upstream still has it"


def _passed_since(state: SyncState, mark: float) -> Callable[[], bool]:
    return lambda: (state.last_successful_sync_at or 0) > mark


def _caught_up(source: SqlSource, since: float) -> bool:
    """A sync and a whole reconciliation pass, both started after ``since``.

    (A key a feed appends while a pass runs and that is deleted before the pass ends is
    the next pass's to find: only a pass that began after the changes sees all of them.)
    """
    entity = source.entities["work_orders"]
    last = entity.reconciler.last
    return (
        entity.state.status == "completed"
        and (entity.state.last_started_at or 0) > since
        and last is not None
        and (last.started_at or 0) > since
    )
