"""The sap_ecc profile against SAP-shaped tables in real PostgreSQL and MariaDB."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import delete, update

from agent.outbox import Outbox
from tests.sql.conftest import Backend, latest, make_source, outbox_records, sql_config
from tests.sql.sapdb import SapDb

BERLIN = ZoneInfo("Europe/Berlin")


def today(offset: int = 0) -> str:
    """An SAP date relative to today in the server zone."""
    return (datetime.now(BERLIN) + timedelta(days=offset)).strftime("%Y%m%d")


async def test_work_orders_map_to_unified_model(backend: Backend, sap: SapDb, outbox: Outbox):
    await sap.order(
        "000004001234",
        ktext="Replace door motor",
        aedat=today(),
        equnr="000000000010000001",
        tplnr="PLANT-1000-LIFT-01",
        gstrp="20261121",
        gsuzp="081500",
    )
    await sap.order("000004001235", ktext="Other client", aedat=today(), mandt="200")
    await sap.order("000004001236", ktext="CO order", aedat=today(), autyp="01")
    source = make_source(sql_config(backend, timezone="Europe/Berlin", include=["work_orders"]))
    try:
        await source.sync_once(outbox)
    finally:
        await source.aclose()
    got = latest(outbox, "work_order")
    assert list(got) == ["000004001234"], "client and order category filters apply"
    rec = got["000004001234"]
    assert rec["op"] == "upsert"
    assert rec["source"] == {"name": "sap-prd", "system": "sap_ecc", "site": "plant-1000"}
    assert rec["data"]["title"] == "Replace door motor"
    assert rec["data"]["status"] == "released"
    assert rec["data"]["sap_status"] == ["I0002"]
    assert rec["data"]["asset_remote_id"] == "000000000010000001"
    assert rec["data"]["location_remote_id"] == "PLANT-1000-LIFT-01"
    # 08:15 Berlin (CET in November) is 07:15 UTC; '00000000' is no date.
    assert rec["data"]["planned_start"] == "2026-11-21T07:15:00.000Z"
    assert rec["data"]["planned_end"] is None
    assert rec["modified_precision"] == "day"
    assert rec["remote_data"]["AUFNR"] == "000004001234"
    assert rec["remote_data"]["KTEXT"] == "Replace door motor"


async def test_rows_sharing_a_boundary_date_across_chunks(
    backend: Backend, sap: SapDb, outbox: Outbox
):
    for i in range(11):
        await sap.order(f"{4000000 + i:012d}", ktext=f"Order {i}", aedat=today())
    source = make_source(sql_config(backend, include=["work_orders"], chunk_size=3))
    try:
        await source.sync_once(outbox)
        first = [r for r in outbox_records(outbox) if r["entity_type"] == "work_order"]
        assert sorted(r["remote_id"] for r in first) == [f"{4000000 + i:012d}" for i in range(11)]
        # The overlap re-reads today's rows; unchanged ones are skipped by content hash.
        status = await source.sync_once(outbox)
        assert status["work_orders"]["progress"]["unchanged"] >= 11
        again = [r for r in outbox_records(outbox) if r["entity_type"] == "work_order"]
        assert len(again) == 11
    finally:
        await source.aclose()


async def test_aedat_day_precision_changes_are_seen(backend: Backend, sap: SapDb, outbox: Outbox):
    """A change later the same day (lower key than the watermark) and the next day."""
    await sap.order("000000000001", ktext="first", aedat=today(-1))
    await sap.order("000000000002", ktext="second", aedat=today(-1))
    source = make_source(sql_config(backend, include=["work_orders"]))
    aufk = sap.table("AUFK")
    try:
        await source.sync_once(outbox)
        # Same day as the watermark, key below the watermark key: only the overlap sees it.
        await sap.execute(
            update(aufk).where(aufk.c.AUFNR == "000000000001").values(KTEXT="first, edited")
        )
        await source.sync_once(outbox)
        assert latest(outbox, "work_order")["000000000001"]["data"]["title"] == "first, edited"
        # Next day: AEDAT moves on.
        await sap.execute(
            update(aufk)
            .where(aufk.c.AUFNR == "000000000002")
            .values(KTEXT="second, next day", AEDAT=today())
        )
        await source.sync_once(outbox)
        assert latest(outbox, "work_order")["000000000002"]["data"]["title"] == "second, next day"
    finally:
        await source.aclose()


async def test_status_only_change_seen_through_jcds(backend: Backend, sap: SapDb, outbox: Outbox):
    objnr = await sap.order("000004009999", ktext="Status only", aedat=today(-30))
    # A recent change elsewhere moves the AEDAT watermark (and its overlap) past that order.
    await sap.order("000004000001", ktext="Recent", aedat=today())
    source = make_source(sql_config(backend, include=["work_orders"]))
    try:
        await source.sync_once(outbox)
        assert latest(outbox, "work_order")["000004009999"]["data"]["status"] == "released"
        # TECO set: JEST row and a JCDS change document; AEDAT stays a month old.
        await sap.insert("JEST", {"OBJNR": objnr, "STAT": "I0045", "CHGNR": "002"})
        now = datetime.now(BERLIN)
        await sap.insert(
            "JCDS",
            {
                "OBJNR": objnr,
                "STAT": "I0045",
                "CHGNR": "002",
                "UDATE": now.strftime("%Y%m%d"),
                "UTIME": now.strftime("%H%M%S"),
                "USNAM": "JDOE",
            },
        )
        await source.sync_once(outbox)
    finally:
        await source.aclose()
    rec = latest(outbox, "work_order")["000004009999"]
    assert rec["data"]["status"] == "completed"
    assert rec["data"]["sap_status"] == ["I0002", "I0045"]


async def test_deletion_flags_give_delete_records(backend: Backend, sap: SapDb, outbox: Outbox):
    await sap.order("000000000010", aedat=today(), loekz="X")
    await sap.order("000000000011", aedat=today(), status=("I0002", "I0076"))
    await sap.order("000000000012", aedat=today())
    await sap.insert(
        "QMEL",
        {"QMNUM": "000010000001", "QMTXT": "Noise", "ERDAT": today(), "OBJNR": "QM000010000001"},
    )
    await sap.insert("JEST", {"OBJNR": "QM000010000001", "STAT": "I0076", "CHGNR": "001"})
    source = make_source(sql_config(backend, include=["work_orders", "notifications"]))
    try:
        await source.sync_once(outbox)
    finally:
        await source.aclose()
    orders = latest(outbox, "work_order")
    assert orders["000000000010"]["op"] == "delete"
    assert orders["000000000011"]["op"] == "delete"
    assert orders["000000000012"]["op"] == "upsert"
    assert latest(outbox, "maintenance_request")["000010000001"]["op"] == "delete"


async def test_zero_dates_and_times(backend: Backend, sap: SapDb, outbox: Outbox):
    await sap.insert(
        "QMEL",
        {
            "QMNUM": "000010000002",
            "QMTXT": "Leak",
            "ERDAT": today(),
            "QMDAT": "20261231",
            "MZEIT": "233000",
            "STRMN": "00000000",
            "OBJNR": "QM000010000002",
        },
    )
    await sap.insert("QMIH", {"QMNUM": "000010000002", "EQUNR": "000000000010000001"})
    source = make_source(sql_config(backend, include=["notifications"], timezone="Europe/Berlin"))
    try:
        await source.sync_once(outbox)
    finally:
        await source.aclose()
    data = latest(outbox, "maintenance_request")["000010000002"]["data"]
    assert data["reported_at"] == "2026-12-31T22:30:00.000Z"
    assert data["required_start"] is None
    assert data["required_end"] is None
    assert data["asset_remote_id"] == "000000000010000001"
    assert data["status"] == "open"


async def test_hard_deletes_found_by_reconciliation(backend: Backend, sap: SapDb, outbox: Outbox):
    for i in range(5):
        await sap.order(f"{i:012d}", aedat=today())
    source = make_source(sql_config(backend, include=["work_orders"], chunk_size=2))
    aufk = sap.table("AUFK")
    try:
        await source.sync_once(outbox, reconcile=True)  # baseline: no deletes
        assert all(r["op"] == "upsert" for r in outbox_records(outbox))
        await sap.execute(delete(aufk).where(aufk.c.AUFNR == "000000000003"))
        await sap.order("000000000007", aedat=today())  # created and removed between runs
        await source.sync_once(outbox)
        await sap.execute(delete(aufk).where(aufk.c.AUFNR == "000000000007"))
        status = await source.sync_once(outbox, reconcile=True)
    finally:
        await source.aclose()
    deletes = sorted(r["remote_id"] for r in outbox_records(outbox) if r["op"] == "delete")
    assert deletes == ["000000000003", "000000000007"]
    assert status["work_orders"]["known_keys"] == 4


async def test_other_entities_map(backend: Backend, sap: SapDb, outbox: Outbox):
    await sap.insert(
        "EQUI",
        {
            "EQUNR": "000000000010000001",
            "ERDAT": today(),
            "EQTYP": "M",
            "HERST": "KONE",
            "SERGE": "SN-1",
            "OBJNR": "IE000000000010000001",
        },
    )
    await sap.insert("EQKT", {"EQUNR": "000000000010000001", "SPRAS": "E", "EQKTX": "Lift 1"})
    await sap.insert(
        "EQUZ",
        {
            "EQUNR": "000000000010000001",
            "DATBI": "99991231",
            "EQLFN": "001",
            "ILOAN": "000000000042",
            "IWERK": "1000",
        },
    )
    await sap.insert("ILOA", {"ILOAN": "000000000042", "TPLNR": "PLANT-1000-B1"})
    await sap.insert("JEST", {"OBJNR": "IE000000000010000001", "STAT": "I0100", "CHGNR": "001"})
    await sap.insert("IFLOT", {"TPLNR": "PLANT-1000-B1", "ERDAT": today(), "TPLMA": "PLANT-1000"})
    await sap.insert("IFLOTX", {"TPLNR": "PLANT-1000-B1", "SPRAS": "E", "PLTXT": "Building 1"})
    await sap.insert("MARA", {"MATNR": "000000000000400001", "ERSDA": today(), "MEINS": "PC"})
    await sap.insert("MAKT", {"MATNR": "000000000000400001", "SPRAS": "E", "MAKTX": "Door motor"})
    await sap.insert(
        "MARD", {"MATNR": "000000000000400001", "WERKS": "1000", "LGORT": "0001", "LABST": 7}
    )
    await sap.insert(
        "EKKO", {"EBELN": "4500000001", "AEDAT": today(), "LIFNR": "0000100001", "WAERS": "EUR"}
    )
    await sap.insert(
        "EKPO",
        {
            "EBELN": "4500000001",
            "EBELP": "00010",
            "AEDAT": today(),
            "MATNR": "000000000000400001",
            "MENGE": 2,
            "NETPR": "120.50",
        },
    )
    await sap.insert("IMPTT", {"POINT": "000000000123", "PTTXT": "Run hours", "MSEHI": "H"})
    await sap.insert(
        "IMRG",
        {
            "MDOCM": "00000000000000000001",
            "POINT": "000000000123",
            "IDATE": today(),
            "ITIME": "120000",
            "READG": 1234.5,
            "ERDAT": today(),
        },
    )
    source = make_source(sql_config(backend))
    try:
        await source.sync_once(outbox)
    finally:
        await source.aclose()
    asset = latest(outbox, "asset")["000000000010000001"]["data"]
    assert (asset["title"], asset["manufacturer"], asset["status"]) == (
        "Lift 1",
        "KONE",
        "installed",
    )
    assert asset["location_remote_id"] == "PLANT-1000-B1"
    loc = latest(outbox, "location")["PLANT-1000-B1"]["data"]
    assert (loc["title"], loc["parent_location_remote_id"]) == ("Building 1", "PLANT-1000")
    assert latest(outbox, "part")["000000000000400001"]["data"]["title"] == "Door motor"
    level = latest(outbox, "inventory_level")["000000000000400001/1000/0001"]["data"]
    assert level["quantity"] == "7.000"
    po = latest(outbox, "purchase_order")["4500000001"]["data"]
    assert po["lines"][0]["net_price"] == "120.50"
    reading = latest(outbox, "meter_reading")["00000000000000000001"]["data"]
    assert (reading["value"], reading["unit"]) == (1234.5, "H")


async def test_bad_rows_are_quarantined_and_the_rest_flows(
    backend: Backend, sap: SapDb, outbox: Outbox
):
    await sap.order("000000000021", aedat=today())
    await sap.order("000000000022", aedat=today(), gstrp="20261341")  # month 13
    await sap.order("000000000023", aedat=today())
    source = make_source(sql_config(backend, include=["work_orders"]))
    try:
        status = await source.sync_once(outbox)
    finally:
        await source.aclose()
    assert sorted(latest(outbox, "work_order")) == ["000000000021", "000000000023"]
    assert status["work_orders"]["progress"]["quarantined"] == 1
    bad = await outbox.quarantined()
    assert len(bad) == 1
    assert bad[0]["reason"] == "mapping_failed: ValueError"
    assert bad[0]["context"]["key"] == ["000000000022"]
    assert "20261341" in bad[0]["payload"]
