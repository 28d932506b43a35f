"""SAP change feeds, each class caught in ONE incremental pass, on PostgreSQL and MariaDB:
change documents (CDHDR), status set and revoked (JCDS/JEST), deletion and undeletion.

Each change class is made the way SAP makes it (the header's AEDAT does not move), then
one incremental pass runs through the real SqlSource into a real outbox. Where a test is
parametrized with ``documents=False``, it shows the change is NOT seen without the change
document feed: that class is left to reconciliation when a site has no change documents.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import update
from sqlalchemy.dialects import mssql, postgresql

from agent import config as cfg
from agent.errors import ConfigError
from agent.outbox import Outbox
from agent.receiver import Store
from agent.sources.sql import SqlSourceConfig, profiles
from agent.sources.sql.engine import Database
from agent.sources.sql.model import Feed, Watermark, chunk_query
from tests.sql.conftest import Backend, latest, make_source, outbox_records, sql_config
from tests.sql.sapdb import SapDb

BERLIN = ZoneInfo("Europe/Berlin")
EQUNR = "000000000010000001"
AUFNR = "000004001234"
QMNUM = "000010000001"
TPLNR = "PLANT-1000-B1"
MATNR = "000000000000400001"
EBELN = "4500000001"


def day(offset: int = 0) -> str:
    """An SAP date relative to today in the server zone."""
    return (datetime.now(BERLIN) + timedelta(days=offset)).strftime("%Y%m%d")


def now() -> datetime:
    """The SAP server's local time, to the second (as UDATE/UTIME store it)."""
    return datetime.now(BERLIN).replace(microsecond=0, tzinfo=None)


Mutation = Callable[[SapDb], Awaitable[None]]


async def one_incremental_pass(
    backend: Backend, sap: SapDb, outbox: Outbox, entity: str, mutate: Mutation, **extra: Any
) -> dict[str, Any]:
    """Initial sync, ``mutate``, one incremental pass: the status of that pass."""
    config = sql_config(backend, include=[entity], timezone="Europe/Berlin", **extra)
    source = make_source(config)
    try:
        await source.sync_once(outbox)
        await mutate(sap)
        return await source.sync_once(outbox)
    finally:
        await source.aclose()


async def recent_neighbour(sap: SapDb) -> None:
    """Rows changed today: the AEDAT watermark (and its one-day overlap) moves past the
    month-old objects under test, as on a live system."""
    await sap.order("000004000001", aedat=day())
    await sap.equipment("000000000019999999", aedat=day())
    await sap.insert("IFLOT", {"TPLNR": "PLANT-9", "ERDAT": day(), "OBJNR": "IFPLANT-9"})
    await sap.insert("QMEL", {"QMNUM": "000019999999", "ERDAT": day(), "OBJNR": "QM19999999"})


# ---------------------------------------------------------------- change documents


async def edit_eqkt(sap: SapDb) -> None:
    eqkt = sap.table("EQKT")
    await sap.execute(update(eqkt).where(eqkt.c.EQUNR == EQUNR).values(EQKTX="Lift 1, new"))
    await sap.change_document("EQUI", EQUNR, "0000100001", now())


async def new_equz_segment(sap: SapDb) -> None:
    """IE4N-style move: the open time segment is closed, a new one points to a new ILOA."""
    equz = sap.table("EQUZ")
    await sap.execute(
        update(equz).where(equz.c.EQUNR == EQUNR, equz.c.DATBI == "99991231").values(DATBI=day(-1))
    )
    await sap.insert("EQUZ", {"EQUNR": EQUNR, "DATBI": "99991231", "EQLFN": "002",
                              "ILOAN": "000000000077", "IWERK": "1000"})  # fmt: skip
    await sap.insert("ILOA", {"ILOAN": "000000000077", "TPLNR": "PLANT-1000-B2"})
    await sap.change_document("EQUI", EQUNR, "0000100002", now())


async def edit_iloa(sap: SapDb) -> None:
    iloa = sap.table("ILOA")
    await sap.execute(
        update(iloa).where(iloa.c.ILOAN == f"E{EQUNR[-11:]}").values(TPLNR="PLANT-1000-B3")
    )
    await sap.change_document("EQUI", EQUNR, "0000100003", now())


async def reassign_afih(sap: SapDb) -> None:
    afih = sap.table("AFIH")
    await sap.execute(update(afih).where(afih.c.AUFNR == AUFNR).values(EQUNR="000000000010000002"))
    await sap.change_document("ORDER", sap.order_objectid(AUFNR), "0000100004", now())


async def edit_iflotx(sap: SapDb) -> None:
    iflotx = sap.table("IFLOTX")
    await sap.execute(update(iflotx).where(iflotx.c.TPLNR == TPLNR).values(PLTXT="Building 1a"))
    await sap.change_document("IFLO", TPLNR, "0000100005", now())


async def edit_qmih(sap: SapDb) -> None:
    qmih = sap.table("QMIH")
    await sap.execute(update(qmih).where(qmih.c.QMNUM == QMNUM).values(EQUNR="000000000010000003"))
    await sap.change_document("QMEL", QMNUM, "0000100006", now())


async def seed(sap: SapDb) -> None:
    """One month-old object per entity, and today's neighbours."""
    await sap.equipment(EQUNR, text="Lift 1", tplnr=TPLNR, aedat=day(-30))
    await sap.order(AUFNR, aedat=day(-30), equnr=EQUNR)
    await sap.insert("IFLOT", {"TPLNR": TPLNR, "ERDAT": day(-30), "OBJNR": f"IF{TPLNR}"})
    await sap.insert("IFLOTX", {"TPLNR": TPLNR, "SPRAS": "E", "PLTXT": "Building 1"})
    await sap.insert("QMEL", {"QMNUM": QMNUM, "ERDAT": day(-30), "OBJNR": f"QM{QMNUM}"})
    await sap.insert("QMIH", {"QMNUM": QMNUM, "EQUNR": EQUNR})
    await recent_neighbour(sap)


CHILD_EDITS = [
    # (change class, entity, unified type, remote id, mutation, field, new value)
    ("EQKT text", "assets", "asset", EQUNR, edit_eqkt, "title", "Lift 1, new"),
    ("new EQUZ segment", "assets", "asset", EQUNR, new_equz_segment, "location_remote_id",
     "PLANT-1000-B2"),
    ("ILOA change", "assets", "asset", EQUNR, edit_iloa, "location_remote_id", "PLANT-1000-B3"),
    ("AFIH reassignment", "work_orders", "work_order", AUFNR, reassign_afih, "asset_remote_id",
     "000000000010000002"),
    ("IFLOTX text", "locations", "location", TPLNR, edit_iflotx, "title", "Building 1a"),
    ("QMIH equipment", "notifications", "maintenance_request", QMNUM, edit_qmih,
     "asset_remote_id", "000000000010000003"),
]  # fmt: skip


@pytest.mark.parametrize("documents", [True, False], ids=["documents", "no-documents"])
@pytest.mark.parametrize(
    ("kind", "entity", "etype", "rid", "mutate", "field", "value"),
    CHILD_EDITS,
    ids=[c[0] for c in CHILD_EDITS],
)
async def test_change_documents_catch_child_table_edits(
    backend: Backend,
    sap: SapDb,
    outbox: Outbox,
    documents: bool,
    kind: str,
    entity: str,
    etype: str,
    rid: str,
    mutate: Mutation,
    field: str,
    value: str,
):
    await seed(sap)
    before = None

    async def change(db: SapDb) -> None:
        nonlocal before
        before = latest(outbox, etype)[rid]["data"][field]
        await mutate(db)

    await one_incremental_pass(backend, sap, outbox, entity, change, change_documents=documents)
    got = latest(outbox, etype)[rid]
    assert before != value
    if documents:
        assert got["data"][field] == value, kind
        assert got["op"] == "upsert"
    else:  # AEDAT did not move: without change documents only reconciliation sees it
        assert got["data"][field] == before, kind


async def test_change_document_time_is_server_local_and_the_watermark_commits(
    backend: Backend, sap: SapDb, outbox: Outbox
):
    await seed(sap)
    at = datetime(2026, 11, 21, 8, 15, 30)  # CET: 07:15:30 UTC, within the initial window

    async def change(db: SapDb) -> None:
        eqkt = db.table("EQKT")
        await db.execute(update(eqkt).where(eqkt.c.EQUNR == EQUNR).values(EQKTX="Lift 1b"))
        await db.change_document("EQUI", EQUNR, "0000200001", at)

    await one_incremental_pass(
        backend, sap, outbox, "assets", change, change_documents=["assets"], initial_window=None
    )
    rec = latest(outbox, "asset")[EQUNR]
    assert rec["data"]["title"] == "Lift 1b"
    assert rec["source_modified_at"] == "2026-11-21T07:15:30.000Z"
    mark = (await outbox.cursor("sap-prd", "watermark:assets"))["feeds"]["change_documents"]
    assert mark == {"m": "20261121081530", "k": [EQUNR, "0000200001"]}


async def test_change_documents_are_client_and_class_scoped(
    backend: Backend, sap: SapDb, outbox: Outbox
):
    await seed(sap)

    async def change(db: SapDb) -> None:
        eqkt = db.table("EQKT")
        await db.execute(update(eqkt).where(eqkt.c.EQUNR == EQUNR).values(EQKTX="unseen"))
        await db.change_document("EQUI", EQUNR, "0000300001", now(), client="200")
        await db.change_document("IFLO", EQUNR, "0000300002", now())  # same id, other class

    await one_incremental_pass(backend, sap, outbox, "assets", change, change_documents=True)
    assert latest(outbox, "asset")[EQUNR]["data"]["title"] == "Lift 1"


async def test_mass_change_documents_in_one_second_across_chunks(
    backend: Backend, sap: SapDb, outbox: Outbox
):
    """More objects than a chunk, every change document in the same second."""
    orders = [f"{4100000 + i:012d}" for i in range(7)]
    for aufnr in orders:
        await sap.order(aufnr, aedat=day(-30), equnr=EQUNR)
    await recent_neighbour(sap)
    at = now()

    async def change(db: SapDb) -> None:
        afih = db.table("AFIH")
        for i, aufnr in enumerate(orders):
            await db.execute(
                update(afih).where(afih.c.AUFNR == aufnr).values(EQUNR="000000000010000009")
            )
            await db.change_document("ORDER", db.order_objectid(aufnr), f"{500 + i:010d}", at)

    await one_incremental_pass(
        backend, sap, outbox, "work_orders", change, change_documents=True, chunk_size=2
    )
    got = latest(outbox, "work_order")
    assert {got[a]["data"]["asset_remote_id"] for a in orders} == {"000000000010000009"}


async def test_full_sync_reads_change_documents_from_their_watermark(
    backend: Backend, sap: SapDb, outbox: Outbox
):
    """A full pass re-reads every row through the AEDAT feed; the CDHDR feed resumes from
    its watermark instead of re-reading the whole change history. (Without reconciliation:
    with it, the whole re-read is the reconciliation pass's, and the feeds run as usual.)"""
    await seed(sap)
    config = sql_config(backend, include=["assets"], change_documents=True, reconcile_interval=None)
    source = make_source(config)
    try:
        await sap.change_document("EQUI", EQUNR, "0000400001", now() - timedelta(days=3))
        await sap.change_document("EQUI", EQUNR, "0000400002", now())
        await source.sync_once(outbox)
        rows_first = source.sync_status()["assets"]["progress"]["rows"]
        await source.sync_once(outbox, full=True)
        rows_full = source.sync_status()["assets"]["progress"]["rows"]
    finally:
        await source.aclose()
    # first: 2 equipment (AEDAT feed) + 2 (CDHDR); full: 2 (every row) + 1 (CDHDR from its
    # watermark minus one hour: the 3-day-old document is not read again).
    assert (rows_first, rows_full) == (4, 3)


# ---------------------------------------------------------------- status feed


def statuses(box: Outbox, aufnr: str = AUFNR) -> list[tuple[str, list[str]]]:
    """Every version of an order appended: (unified status, active system statuses)."""
    return [
        (r["data"]["status"], r["data"]["sap_status"])
        for r in outbox_records(box)
        if r["entity_type"] == "work_order" and r["remote_id"] == aufnr
    ]


async def test_status_revoked_is_a_change(backend: Backend, sap: SapDb, outbox: Outbox):
    objnr = await sap.order(AUFNR, aedat=day(-30))
    await recent_neighbour(sap)
    source = make_source(sql_config(backend, include=["work_orders"]))
    try:
        await source.sync_once(outbox)
        await sap.set_status(objnr, "I0045", "002", now())  # TECO set
        await source.sync_once(outbox)
        await sap.set_status(objnr, "I0045", "003", now(), active=False)  # TECO revoked
        await source.sync_once(outbox)
    finally:
        await source.aclose()
    assert statuses(outbox) == [
        ("released", ["I0002"]),
        ("completed", ["I0002", "I0045"]),
        ("released", ["I0002"]),
    ]


async def test_set_revoke_set_within_one_interval_ends_with_the_exact_active_set(
    backend: Backend, sap: SapDb, outbox: Outbox
):
    objnr = await sap.order(AUFNR, aedat=day(-30))
    await recent_neighbour(sap)
    at = now()

    async def flip(db: SapDb) -> None:
        # The same second: only CHGNR orders these JCDS rows.
        await db.set_status(objnr, "I0045", "002", at)
        await db.set_status(objnr, "I0045", "003", at, active=False)
        await db.set_status(objnr, "I0045", "004", at)
        await db.set_status(objnr, "I0009", "005", at)  # CNF set
        await db.set_status(objnr, "I0009", "006", at, active=False)  # and revoked

    await one_incremental_pass(backend, sap, outbox, "work_orders", flip, chunk_size=2)
    assert statuses(outbox)[-1] == ("completed", ["I0002", "I0045"])


async def test_same_second_status_changes_of_many_objects_across_chunks(
    backend: Backend, sap: SapDb, outbox: Outbox
):
    orders = [f"{4200000 + i:012d}" for i in range(9)]
    objnrs = [await sap.order(a, aedat=day(-30)) for a in orders]
    await recent_neighbour(sap)
    at = now()

    async def teco_all(db: SapDb) -> None:
        for objnr in objnrs:
            await db.set_status(objnr, "I0045", "002", at)

    status = await one_incremental_pass(backend, sap, outbox, "work_orders", teco_all, chunk_size=2)
    got = latest(outbox, "work_order")
    assert {got[a]["data"]["status"] for a in orders} == {"completed"}
    assert status["work_orders"]["progress"]["stored"] == len(orders)


class Upstream:
    """The reference receiver's store, fed each pass's new records in outbox order (what
    the forwarder would send), to read its latest version of every entity."""

    def __init__(self, path: Path, box: Outbox) -> None:
        self.store, self.box, self.sent = Store(path), box, 0

    def deliver(self) -> dict[str, dict[str, Any]]:
        """Send what was appended since the last call; the receiver's latest work orders."""
        new = [r for r in outbox_records(self.box) if r["seq"] > self.sent]
        if new:
            self.store.ingest("test-agent", f"batch-{self.sent}", new)
            self.sent = new[-1]["seq"]
        return self.store.latest("sap-prd", "work_order")


async def test_status_set_revoke_set_across_sync_boundaries(
    backend: Backend, sap: SapDb, outbox: Outbox, tmp_path: Path
):
    """A, B, A, B, one pass each: every transition is a version of its own (chained ids),
    so the upstream's latest follows the source; with ids from content alone the third
    would repeat the first's id and the upstream would stay at B."""
    objnr = await sap.order(AUFNR, aedat=day(-30))
    await recent_neighbour(sap)
    upstream = Upstream(tmp_path / "rx.db", outbox)
    source = make_source(sql_config(backend, include=["work_orders"]))
    seen = []
    try:
        await source.sync_once(outbox)
        seen.append(upstream.deliver()[AUFNR]["data"]["status"])
        for chgnr, active in (("002", True), ("003", False), ("004", True)):
            await sap.set_status(objnr, "I0045", chgnr, now(), active=active)
            await source.sync_once(outbox)
            seen.append(upstream.deliver()[AUFNR]["data"]["status"])
    finally:
        await source.aclose()
        upstream.store.close()
    assert [s for s, _ in statuses(outbox)] == ["released", "completed", "released", "completed"]
    assert seen == ["released", "completed", "released", "completed"]
    ids = [r["id"] for r in outbox_records(outbox) if r["remote_id"] == AUFNR]
    assert len(set(ids)) == 4


# ---------------------------------------------------------------- deletion semantics


async def test_cancelled_measurement_document_becomes_a_delete(
    backend: Backend, sap: SapDb, outbox: Outbox
):
    mdocm = "00000000000000000001"
    await sap.insert("IMPTT", {"POINT": "000000000123", "PTTXT": "Run hours", "MSEHI": "H"})
    await sap.insert("IMRG", {"MDOCM": mdocm, "POINT": "000000000123", "IDATE": day(-30),
                              "ITIME": "120000", "READG": 10.5, "ERDAT": day(-30)})  # fmt: skip
    await sap.insert("IMRG", {"MDOCM": "00000000000000000002", "POINT": "000000000123",
                              "IDATE": day(), "READG": 11.0, "ERDAT": day()})  # fmt: skip

    async def cancel(db: SapDb) -> None:
        imrg = db.table("IMRG")
        await db.execute(update(imrg).where(imrg.c.MDOCM == mdocm).values(CANCL="X", AEDAT=day()))

    await one_incremental_pass(backend, sap, outbox, "readings", cancel)
    rec = latest(outbox, "meter_reading")[mdocm]
    assert rec["op"] == "delete"
    assert rec["data"]["value"] == 10.5


DELETIONS = [
    # (entity, unified type, remote id, delete, undelete)
    ("work_orders", "work_order", AUFNR, "LOEKZ", "AUFK"),
    ("work_orders", "work_order", AUFNR, "DLFL", f"OR{AUFNR}"),
    ("assets", "asset", EQUNR, "DLFL", f"IE{EQUNR}"),
    ("locations", "location", TPLNR, "DLFL", f"IF{TPLNR}"),
    ("notifications", "maintenance_request", QMNUM, "DLFL", f"QM{QMNUM}"),
    ("parts", "part", MATNR, "LVORM", "MARA"),
    ("purchase_orders", "purchase_order", EBELN, "LOEKZ", "EKKO"),
]


async def flag(sap: SapDb, table: str, column: str, key: dict[str, str], value: str) -> None:
    t = sap.table(table)
    changed = {"LAEDA" if table == "MARA" else "AEDAT": day()}
    cond = [t.c[k] == v for k, v in key.items()]
    await sap.execute(update(t).where(*cond).values({column: value, **changed}))


@pytest.mark.parametrize(("entity", "etype", "rid", "how", "where"), DELETIONS,
                         ids=[f"{d[0]}-{d[3]}" for d in DELETIONS])  # fmt: skip
async def test_deletion_and_undeletion_per_entity(
    backend: Backend,
    sap: SapDb,
    outbox: Outbox,
    entity: str,
    etype: str,
    rid: str,
    how: str,
    where: str,
    tmp_path: Path,
):
    """docs/sql-sources.md, "Deletion": a flag or DLFL gives op = delete; removing it
    brings the entity back as an upsert (each in one incremental pass)."""
    await seed(sap)
    await sap.insert("MARA", {"MATNR": MATNR, "ERSDA": day(-30), "MEINS": "PC"})
    await sap.insert("EKKO", {"EBELN": EBELN, "AEDAT": day(-30), "WAERS": "EUR"})
    keys = {"AUFK": {"AUFNR": rid}, "MARA": {"MATNR": rid}, "EKKO": {"EBELN": rid}}
    source = make_source(sql_config(backend, include=[entity]))
    upstream = Upstream(tmp_path / "rx.db", outbox)
    ops, received = [], []

    async def sync() -> None:
        await source.sync_once(outbox)
        ops.append(latest(outbox, etype)[rid]["op"])
        upstream.deliver()
        received.append(upstream.store.latest("sap-prd", etype)[rid]["op"])

    try:
        await sync()
        for n, on in enumerate((True, False)):
            if how == "DLFL":
                await sap.set_status(where, "I0076", f"{n + 2:03d}", now(), active=on)
            else:
                await flag(sap, where, how, keys[where], "X" if on else "")
            await sync()
    finally:
        await source.aclose()
        upstream.store.close()
    assert ops == ["upsert", "delete", "upsert"]
    # The undeleted version has the first one's content; the upstream still takes it.
    assert received == ["upsert", "delete", "upsert"]


def compiled(stmt: Any, dialect: Any = None) -> str:
    """SQL text of ``stmt`` with its values inlined."""
    return str(
        stmt.compile(
            dialect=dialect or postgresql.dialect(), compile_kwargs={"literal_binds": True}
        )
    )


def feeds_of(entity: str) -> dict[str, Feed]:
    """The feeds the profile builds for ``entity`` with change documents on."""
    url = "postgresql+asyncpg://edge@sap-db/prd"
    config = SqlSourceConfig.model_validate(
        {"type": "sql", "profile": "sap_ecc", "url": url, "schema": "SAPSR3",
         "change_documents": [entity], "include": [entity]}
    )  # fmt: skip
    (spec,) = profiles.build(config, Database(config))
    return {f.name: f for f in spec.feeds}


def test_change_document_and_status_chunks_filter_on_the_date_column():
    """UDATE || UTIME cannot use an index; the plain ``UDATE >=`` beside it can."""
    feeds = feeds_of("assets")
    assert list(feeds) == ["changes", "status", "change_documents"]
    after = Watermark("20261121081530", None)
    for name, table in (("change_documents", "CDHDR"), ("status", "JCDS")):
        sql = compiled(chunk_query(feeds[name], after, 10))
        assert f'"SAPSR3"."{table}"."UDATE" >= \'20261121\'' in sql, sql
    assert '"SAPSR3"."CDHDR"."OBJECTCLAS" = \'EQUI\'' in compiled(feeds["change_documents"].select)


def test_order_change_documents_name_the_order_at_offset_six():
    select = feeds_of("work_orders")["change_documents"].select
    assert 'substr("SAPSR3"."CDHDR"."OBJECTID", 6, 12) = "SAPSR3"."AUFK"."AUFNR"' in compiled(
        select
    )
    assert "SUBSTRING([SAPSR3].[CDHDR].[OBJECTID], 6, 12)" in compiled(select, mssql.dialect())


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"change_documents": ["assets", "parts"]}, "no change documents for ['parts']"),
        ({"profile": "maximo", "change_documents": True}, "is for profile 'sap_ecc'"),
    ],
)
def test_change_documents_config_is_checked(extra: dict[str, Any], problem: str):
    source = {"type": "sql", "profile": "sap_ecc", "url": "postgresql+asyncpg://e@h/db", **extra}
    data = {"upstream": {"url": "https://example.invalid", "token": "t"},
            "sources": {"sap": source}}  # fmt: skip
    with pytest.raises(ConfigError) as err:
        cfg.parse(data)
    assert [k for k, _ in err.value.problems] == ["sources.sap"]
    assert problem in err.value.problems[0][1]
