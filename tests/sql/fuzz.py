"""A seeded SAP change fuzzer: realistic plant-maintenance changes and their truth.

``KINDS`` is the table of mutation kinds. Each changes SAP-shaped tables the way a
transaction, a background job or a script would, and names the feed that sees it in ONE
incremental pass (``seen_by``: a feed name of the ``sap_ecc`` entity), or ``None`` when
only content reconciliation can (no change date moves, no change document or JCDS row is
written). The tag is checked against the entity's feeds when the fuzzer runs, so a kind
whose feed is not configured counts as reconciliation-only. Whoever adds a feed updates
the tags here, and the fuzzer holds them to it: a drift (reconciliation had to send it)
on an entity that only feed-seen kinds touched fails the run.

The truth (:func:`truth`) is read back from the tables with its own, plain rules (the
profile's SQL and mappers are not used), projected onto the fields the kinds change.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import delete, select, update

from tests.sql.sapdb import SapDb

BERLIN = ZoneInfo("Europe/Berlin")
OPEN_END = "99991231"
ENTITY_TYPES = {
    "work_orders": "work_order",
    "assets": "asset",
    "locations": "location",
    "notifications": "maintenance_request",
    "readings": "meter_reading",
    "parts": "part",
    "inventory": "inventory_level",
    "purchase_orders": "purchase_order",
}
Z_FIELD = ("AUFK", "ZZCONTRACT")
"""A customer field appended to AUFK (CI_AUFK), mapped as ``custom.zz_contract``."""


def now() -> datetime:
    """The SAP server's local time (SAP stores dates and times local)."""
    return datetime.now(BERLIN).replace(microsecond=0)


def sap_day(offset: int = 0) -> str:
    return (now() + timedelta(days=offset)).strftime("%Y%m%d")


def text(value: Any) -> str | None:
    out = str(value or "").rstrip()
    return out or None


# ---------------------------------------------------------------------- the world


@dataclass
class World:
    """The fixture database and what the fuzzer knows about its objects."""

    sap: SapDb
    rng: random.Random
    mass: int
    """Rows one mass change touches (more than a chunk)."""
    live: dict[str, list[str]] = field(default_factory=dict)
    flagged: set[str] = field(default_factory=set)
    """Orders with LOEKZ set (for undelete)."""
    serial: int = 0
    chgnr: dict[str, int] = field(default_factory=dict)
    changenr: int = 0
    fed: set[tuple[str, str]] = field(default_factory=set)
    """Keys a feed-seen kind touched: feeds re-read them for a while (AEDAT overlap of a
    day, JCDS/CDHDR overlap of an hour), so any later change of theirs is seen too."""

    def next(self) -> int:
        self.serial += 1
        return self.serial

    def pick(self, entity: str, n: int = 1) -> list[str]:
        """``n`` live keys; one key preferably one no feed re-reads anyway, so a kind's
        tag is what decides whether a feed sees it (a wrong tag then fails the run)."""
        pool = self.live.get(entity) or []
        calm = [k for k in pool if (entity, k) not in self.fed]
        if n == 1 and calm:
            pool = calm
        return self.rng.sample(pool, min(n, len(pool)))

    def add(self, entity: str, key: str) -> None:
        self.live.setdefault(entity, []).append(key)

    def drop(self, entity: str, key: str) -> None:
        self.live[entity].remove(key)

    async def status(self, objnr: str, stat: str, at: datetime, *, active: bool = True) -> None:
        """Set or revoke a system status the way SAP does (JEST + a JCDS document)."""
        self.chgnr[objnr] = self.chgnr.get(objnr, 1) + 1
        await self.sap.set_status(objnr, stat, f"{self.chgnr[objnr]:03d}", at, active=active)

    async def change_document(self, objectclas: str, objectid: str) -> None:
        self.changenr += 1
        await self.sap.change_document(objectclas, objectid, f"{self.changenr:010d}", now())

    async def set(self, table: str, where: dict[str, str], **values: Any) -> None:
        t = self.sap.table(table)
        cond = [t.c.MANDT == self.sap.client, *(t.c[k] == v for k, v in where.items())]
        await self.sap.execute(update(t).where(*cond).values(**values))

    async def remove(self, table: str, **where: str) -> None:
        t = self.sap.table(table)
        cond = [t.c.MANDT == self.sap.client, *(t.c[k] == v for k, v in where.items())]
        await self.sap.execute(delete(t).where(*cond))

    # -- objects --------------------------------------------------------------------

    async def location(self, day: str) -> str:
        n = self.next()
        tplnr, iloan = f"PLANT-{n:05d}", f"F{n:011d}"
        await self.sap.insert("IFLOT", {"TPLNR": tplnr, "FLTYP": "A", "ERDAT": day,
                                        "AEDAT": day, "OBJNR": f"IF{tplnr}", "ILOAN": iloan,
                                        "IWERK": "1000"})  # fmt: skip
        await self.sap.insert("IFLOTX", {"TPLNR": tplnr, "SPRAS": "E", "PLTXT": f"Area {n}"})
        await self.sap.insert("ILOA", {"ILOAN": iloan, "TPLNR": tplnr, "SWERK": "1000"})
        await self.sap.insert("JEST", {"OBJNR": f"IF{tplnr}", "STAT": "I0099", "CHGNR": "001"})
        self.add("locations", tplnr)
        return tplnr

    def some_location(self) -> str:
        return self.rng.choice(self.live["locations"])

    async def equipment(self, day: str) -> str:
        n = self.next()
        equnr, iloan = f"{10000000 + n:018d}", f"E{n:011d}"
        await self.sap.insert("EQUI", {"EQUNR": equnr, "ERDAT": day, "AEDAT": day,
                                       "EQTYP": "M", "HERST": "KONE", "OBJNR": f"IE{equnr}"})  # fmt: skip
        await self.sap.insert("EQKT", {"EQUNR": equnr, "SPRAS": "E", "EQKTX": f"Lift {n}"})
        await self.sap.insert("EQUZ", {"EQUNR": equnr, "DATBI": OPEN_END, "EQLFN": "001",
                                       "ILOAN": iloan, "IWERK": "1000"})  # fmt: skip
        await self.sap.insert("ILOA", {"ILOAN": iloan, "TPLNR": self.some_location()})
        await self.sap.insert("JEST", {"OBJNR": f"IE{equnr}", "STAT": "I0100", "CHGNR": "001"})
        self.add("assets", equnr)
        return equnr

    async def order(self, day: str, *, erdat: str | None = None) -> str:
        n = self.next()
        aufnr, iloan = f"{4000000 + n:012d}", f"L{n:011d}"
        equnr = self.rng.choice(self.live["assets"])
        await self.sap.insert("AUFK", {"AUFNR": aufnr, "AUART": "PM01", "AUTYP": "30",
                                       "KTEXT": f"Order {n}", "ERDAT": erdat or day,
                                       "AEDAT": day, "WERKS": "1000", "OBJNR": f"OR{aufnr}",
                                       Z_FIELD[1]: f"C-{n % 7}"})  # fmt: skip
        await self.sap.insert("AFIH", {"AUFNR": aufnr, "EQUNR": equnr, "ILOAN": iloan,
                                       "PRIOK": "2", "IWERK": "1000"})  # fmt: skip
        await self.sap.insert("AFKO", {"AUFNR": aufnr, "GSTRP": day, "GSUZP": "080000"})
        await self.sap.insert("ILOA", {"ILOAN": iloan, "TPLNR": self.some_location()})
        await self.sap.insert("JEST", {"OBJNR": f"OR{aufnr}", "STAT": "I0002", "CHGNR": "001"})
        self.add("work_orders", aufnr)
        return aufnr

    async def notification(self, day: str) -> str:
        n = self.next()
        qmnum = f"{10000000 + n:012d}"
        await self.sap.insert("QMEL", {"QMNUM": qmnum, "QMART": "M1", "QMTXT": f"Noise {n}",
                                       "ERDAT": day, "AEDAT": day, "OBJNR": f"QM{qmnum}"})  # fmt: skip
        await self.sap.insert("QMIH", {"QMNUM": qmnum, "EQUNR": self.rng.choice(self.live["assets"])})
        await self.sap.insert("JEST", {"OBJNR": f"QM{qmnum}", "STAT": "I0068", "CHGNR": "001"})
        self.add("notifications", qmnum)
        return qmnum

    async def reading(self, day: str) -> str:
        n = self.next()
        mdocm = f"{n:020d}"
        await self.sap.insert("IMRG", {"MDOCM": mdocm, "POINT": "000000000123", "IDATE": day,
                                       "ITIME": "120000", "READG": float(n), "ERDAT": day,
                                       "AEDAT": day})  # fmt: skip
        self.add("readings", mdocm)
        return mdocm

    async def part(self, day: str) -> str:
        n = self.next()
        matnr = f"{400000 + n:018d}"
        await self.sap.insert("MARA", {"MATNR": matnr, "MTART": "ERSA", "MEINS": "PC",
                                       "ERSDA": day, "LAEDA": day})  # fmt: skip
        await self.sap.insert("MAKT", {"MATNR": matnr, "SPRAS": "E", "MAKTX": f"Part {n}"})
        await self.sap.insert("MARD", {"MATNR": matnr, "WERKS": "1000", "LGORT": "0001",
                                       "LABST": n % 50})  # fmt: skip
        self.add("parts", matnr)
        self.add("inventory", f"{matnr}/1000/0001")
        return matnr

    async def purchase_order(self, day: str) -> str:
        n = self.next()
        ebeln = f"{4500000000 + n}"
        await self.sap.insert("EKKO", {"EBELN": ebeln, "BUKRS": "1000", "BSART": "NB",
                                       "AEDAT": day, "LIFNR": f"{100000 + n % 9:010d}",
                                       "WAERS": "EUR", "BEDAT": day})  # fmt: skip
        for line in ("00010", "00020"):
            await self.sap.insert("EKPO", {"EBELN": ebeln, "EBELP": line, "AEDAT": day,
                                           "MATNR": self.rng.choice(self.live["parts"]),
                                           "MENGE": 1 + n % 5, "NETPR": "10.00"})  # fmt: skip
        self.add("purchase_orders", ebeln)
        return ebeln

    async def populate(self, sizes: dict[str, int]) -> None:
        """Objects last changed days to weeks ago (within the initial window)."""
        await self.sap.insert("IMPTT", {"POINT": "000000000123", "PTTXT": "Run hours",
                                        "MSEHI": "H"})  # fmt: skip
        makers: list[tuple[str, Callable[[str], Awaitable[str]]]] = [
            ("locations", self.location), ("assets", self.equipment), ("parts", self.part),
            ("work_orders", self.order), ("notifications", self.notification),
            ("readings", self.reading), ("purchase_orders", self.purchase_order),
        ]  # fmt: skip
        for entity, make in makers:
            for _ in range(sizes.get(entity, 0)):
                await make(sap_day(-self.rng.randrange(2, 60)))


# ---------------------------------------------------------------------- kinds

Mutation = Callable[[World], Awaitable[list[str]]]


@dataclass(frozen=True)
class Kind:
    """One class of change: which entity, which feed sees it (None: reconciliation)."""

    name: str
    entity: str
    seen_by: str | None
    run: Mutation


KINDS: list[Kind] = []


def kind(name: str, entity: str, seen_by: str | None) -> Callable[[Mutation], Mutation]:
    def register(fn: Mutation) -> Mutation:
        KINDS.append(Kind(name, entity, seen_by, fn))
        return fn

    return register


ORDER_STATUSES = ("I0010", "I0045", "I0009", "I0046")


async def _active(w: World, objnr: str) -> list[str]:
    j = w.sap.table("JEST")
    async with w.sap.engine.connect() as conn:
        rows = await conn.execute(
            select(j.c.STAT).where(j.c.MANDT == w.sap.client, j.c.OBJNR == objnr, j.c.INACT == "")
        )
        return [r[0] for r in rows]


@kind("order_created", "work_orders", "changes")
async def _(w: World) -> list[str]:
    return [await w.order(sap_day())]


@kind("order_created_backdated", "work_orders", None)
async def _(w: World) -> list[str]:
    """Created by a migration with last month's dates: beyond the feed's overlap."""
    return [await w.order(sap_day(-w.rng.randrange(10, 30)))]


@kind("order_text_edited", "work_orders", "changes")
async def _(w: World) -> list[str]:
    keys = w.pick("work_orders")
    for k in keys:
        await w.set("AUFK", {"AUFNR": k}, KTEXT=f"Edited {w.next()}", AEDAT=sap_day())
    return keys


@kind("order_text_by_script", "work_orders", None)
async def _(w: World) -> list[str]:
    keys = w.pick("work_orders")
    for k in keys:
        await w.set("AUFK", {"AUFNR": k}, KTEXT=f"Script {w.next()}")
    return keys


@kind("order_mass_text", "work_orders", "changes")
async def _(w: World) -> list[str]:
    """A mass change (IW38 + a report) of more orders than a chunk, one date."""
    keys = w.pick("work_orders", w.mass)
    for k in keys:
        await w.set("AUFK", {"AUFNR": k}, KTEXT=f"Mass {w.next()}", AEDAT=sap_day())
    return keys


@kind("order_reassigned", "work_orders", "change_documents")
async def _(w: World) -> list[str]:
    """IW32: other equipment in AFIH; AUFK.AEDAT stays, a change document is written."""
    keys = w.pick("work_orders")
    for k in keys:
        await w.set("AFIH", {"AUFNR": k}, EQUNR=w.rng.choice(w.live["assets"]))
        await w.change_document("ORDER", w.sap.order_objectid(k))
    return keys


@kind("order_reassigned_by_script", "work_orders", None)
async def _(w: World) -> list[str]:
    keys = w.pick("work_orders")
    for k in keys:
        await w.set("AFIH", {"AUFNR": k}, EQUNR=w.rng.choice(w.live["assets"]))
    return keys


@kind("order_moved", "work_orders", "change_documents")
async def _(w: World) -> list[str]:
    """A new location: a new ILOA row, AFIH.ILOAN pointing to it, a change document."""
    keys = w.pick("work_orders")
    for k in keys:
        iloan = f"M{w.next():011d}"
        await w.sap.insert("ILOA", {"ILOAN": iloan, "TPLNR": w.some_location()})
        await w.set("AFIH", {"AUFNR": k}, ILOAN=iloan)
        await w.change_document("ORDER", w.sap.order_objectid(k))
    return keys


@kind("order_iloa_by_script", "work_orders", None)
async def _(w: World) -> list[str]:
    """The order's ILOA row changed in place (ILOA has no change date)."""
    keys = w.pick("work_orders")
    afih = w.sap.table("AFIH")
    for k in keys:
        async with w.sap.engine.connect() as conn:
            iloan = (await conn.execute(select(afih.c.ILOAN).where(afih.c.AUFNR == k))).scalar()
        await w.set("ILOA", {"ILOAN": str(iloan)}, TPLNR=w.some_location())
    return keys


@kind("order_rescheduled", "work_orders", None)
async def _(w: World) -> list[str]:
    """AFKO basic start date moved by a scheduling run: AFKO has no change date."""
    keys = w.pick("work_orders")
    for k in keys:
        await w.set("AFKO", {"AUFNR": k}, GSTRP=sap_day(w.rng.randrange(1, 30)), GSUZP="070000")
    return keys


@kind("order_zfield", "work_orders", None)
async def _(w: World) -> list[str]:
    keys = w.pick("work_orders")
    for k in keys:
        await w.set("AUFK", {"AUFNR": k}, **{Z_FIELD[1]: f"Z-{w.next()}"})
    return keys


@kind("order_status_set", "work_orders", "status")
async def _(w: World) -> list[str]:
    keys = w.pick("work_orders")
    for k in keys:
        await w.status(f"OR{k}", w.rng.choice(ORDER_STATUSES), now())
    return keys


@kind("order_status_revoked", "work_orders", "status")
async def _(w: World) -> list[str]:
    """TECO (or another status) taken back: JEST INACT = X and a JCDS row saying so."""
    keys = w.pick("work_orders")
    for k in keys:
        active = [s for s in await _active(w, f"OR{k}") if s != "I0002"]
        if active:
            await w.status(f"OR{k}", w.rng.choice(active), now(), active=False)
    return keys


@kind("order_status_set_revoke_set", "work_orders", "status")
async def _(w: World) -> list[str]:
    keys = w.pick("work_orders")
    for k in keys:
        stat = w.rng.choice(ORDER_STATUSES)
        for active in (True, False, True):
            await w.status(f"OR{k}", stat, now(), active=active)
    return keys


@kind("order_status_revoked_by_report", "work_orders", None)
async def _(w: World) -> list[str]:
    """A report sets JEST INACT directly, without a status change document."""
    keys = w.pick("work_orders")
    for k in keys:
        active = [s for s in await _active(w, f"OR{k}") if s != "I0002"]
        if active:
            await w.set("JEST", {"OBJNR": f"OR{k}", "STAT": w.rng.choice(active)}, INACT="X")
    return keys


@kind("order_mass_teco_same_second", "work_orders", "status")
async def _(w: World) -> list[str]:
    """A mass TECO: JCDS rows of more objects than a chunk, all in the same second."""
    keys = w.pick("work_orders", w.mass)
    at = now()
    for k in keys:
        await w.status(f"OR{k}", "I0045", at)
    return keys


@kind("order_deletion_flag", "work_orders", "changes")
async def _(w: World) -> list[str]:
    keys = w.pick("work_orders")
    for k in keys:
        await w.set("AUFK", {"AUFNR": k}, LOEKZ="X", AEDAT=sap_day())
        w.flagged.add(k)
    return keys


@kind("order_undeleted", "work_orders", "changes")
async def _(w: World) -> list[str]:
    keys = sorted(w.flagged & set(w.live["work_orders"]))[:1]
    for k in keys:
        await w.set("AUFK", {"AUFNR": k}, LOEKZ="", AEDAT=sap_day())
        w.flagged.discard(k)
    return keys


@kind("order_dlfl", "work_orders", "status")
async def _(w: World) -> list[str]:
    keys = w.pick("work_orders")
    for k in keys:
        await w.status(f"OR{k}", "I0076", now())
    return keys


@kind("order_dlfl_revoked", "work_orders", "status")
async def _(w: World) -> list[str]:
    keys = w.pick("work_orders")
    for k in keys:
        if "I0076" in await _active(w, f"OR{k}"):
            await w.status(f"OR{k}", "I0076", now(), active=False)
    return keys


@kind("order_hard_deleted", "work_orders", None)
async def _(w: World) -> list[str]:
    """Archived (SARA): the rows are gone, nothing is left to date the change."""
    keys = w.pick("work_orders")
    for k in keys:
        for table in ("AUFK", "AFIH", "AFKO"):
            await w.remove(table, AUFNR=k)
        await w.remove("JEST", OBJNR=f"OR{k}")
        w.drop("work_orders", k)
        w.flagged.discard(k)
    return keys


@kind("asset_text_eqkt", "assets", None)
async def _(w: World) -> list[str]:
    """EQKT has no change date; no change document here (the field is not flagged)."""
    keys = w.pick("assets")
    for k in keys:
        await w.set("EQKT", {"EQUNR": k, "SPRAS": "E"}, EQKTX=f"Lift text {w.next()}")
    return keys


@kind("asset_text_eqkt_documented", "assets", "change_documents")
async def _(w: World) -> list[str]:
    keys = w.pick("assets")
    for k in keys:
        await w.set("EQKT", {"EQUNR": k, "SPRAS": "E"}, EQKTX=f"Lift text {w.next()}")
        await w.change_document("EQUI", k)
    return keys


@kind("asset_moved", "assets", "change_documents")
async def _(w: World) -> list[str]:
    """IE02 installation elsewhere: the open EQUZ segment closed, a new one with a new
    ILOA; EQUI.AEDAT stays; the EQUI change document is written."""
    keys = w.pick("assets")
    equz = w.sap.table("EQUZ")
    for k in keys:
        async with w.sap.engine.connect() as conn:
            eqlfn = (
                await conn.execute(
                    select(equz.c.EQLFN).where(equz.c.EQUNR == k, equz.c.DATBI == OPEN_END)
                )
            ).scalar()
        nxt = f"{int(eqlfn or 0) + 1:03d}"
        await w.set("EQUZ", {"EQUNR": k, "DATBI": OPEN_END}, DATBI=sap_day(-1))
        iloan = f"N{w.next():011d}"
        await w.sap.insert("ILOA", {"ILOAN": iloan, "TPLNR": w.some_location()})
        await w.sap.insert("EQUZ", {"EQUNR": k, "DATBI": OPEN_END, "EQLFN": nxt,
                                    "ILOAN": iloan, "IWERK": "1000"})  # fmt: skip
        await w.change_document("EQUI", k)
    return keys


@kind("asset_iloa_by_script", "assets", None)
async def _(w: World) -> list[str]:
    keys = w.pick("assets")
    equz = w.sap.table("EQUZ")
    for k in keys:
        async with w.sap.engine.connect() as conn:
            iloan = (
                await conn.execute(
                    select(equz.c.ILOAN).where(equz.c.EQUNR == k, equz.c.DATBI == OPEN_END)
                )
            ).scalar()
        await w.set("ILOA", {"ILOAN": str(iloan)}, TPLNR=w.some_location())
    return keys


@kind("asset_edited", "assets", "changes")
async def _(w: World) -> list[str]:
    keys = w.pick("assets")
    for k in keys:
        await w.set("EQUI", {"EQUNR": k}, HERST=f"MAKER {w.next()}", AEDAT=sap_day())
    return keys


@kind("asset_created", "assets", "changes")
async def _(w: World) -> list[str]:
    """IE01: new equipment (ERDAT and AEDAT today); keeps the pool from running dry in
    long runs, where every deck hard-deletes one."""
    return [await w.equipment(sap_day())]


@kind("asset_status", "assets", "status")
async def _(w: World) -> list[str]:
    keys = w.pick("assets")
    for k in keys:
        stat = w.rng.choice(("I0099", "I0100", "I0320"))
        await w.status(f"IE{k}", stat, now(), active=w.rng.random() < 0.7)
    return keys


@kind("asset_dlfl", "assets", "status")
async def _(w: World) -> list[str]:
    keys = w.pick("assets")
    for k in keys:
        await w.status(f"IE{k}", "I0076", now(), active="I0076" not in await _active(w, f"IE{k}"))
    return keys


@kind("asset_hard_deleted", "assets", None)
async def _(w: World) -> list[str]:
    keys = w.pick("assets") if len(w.live["assets"]) > 2 else []  # orders need equipment
    for k in keys:
        for table in ("EQUI", "EQKT", "EQUZ"):
            await w.remove(table, EQUNR=k)
        await w.remove("JEST", OBJNR=f"IE{k}")
        w.drop("assets", k)
    return keys


@kind("location_text", "locations", None)
async def _(w: World) -> list[str]:
    keys = w.pick("locations")
    for k in keys:
        await w.set("IFLOTX", {"TPLNR": k, "SPRAS": "E"}, PLTXT=f"Area {w.next()}")
    return keys


@kind("location_status", "locations", "status")
async def _(w: World) -> list[str]:
    keys = w.pick("locations")
    for k in keys:
        active = "I0320" not in await _active(w, f"IF{k}")
        await w.status(f"IF{k}", "I0320", now(), active=active)
    return keys


@kind("notification_text", "notifications", "changes")
async def _(w: World) -> list[str]:
    keys = w.pick("notifications")
    for k in keys:
        await w.set("QMEL", {"QMNUM": k}, QMTXT=f"Noise {w.next()}", AEDAT=sap_day())
    return keys


@kind("notification_reassigned", "notifications", "change_documents")
async def _(w: World) -> list[str]:
    keys = w.pick("notifications")
    for k in keys:
        await w.set("QMIH", {"QMNUM": k}, EQUNR=w.rng.choice(w.live["assets"]))
        await w.change_document("QMEL", k)
    return keys


@kind("notification_status", "notifications", "status")
async def _(w: World) -> list[str]:
    keys = w.pick("notifications")
    for k in keys:
        await w.status(f"QM{k}", w.rng.choice(("I0070", "I0072")), now())
    return keys


@kind("reading_created", "readings", "changes")
async def _(w: World) -> list[str]:
    return [await w.reading(sap_day())]


@kind("reading_cancelled", "readings", "changes")
async def _(w: World) -> list[str]:
    """IK11 cancels a measurement document: CANCL = X, AEDAT set."""
    keys = w.pick("readings")
    for k in keys:
        await w.set("IMRG", {"MDOCM": k}, CANCL="X", AEDAT=sap_day())
    return keys


@kind("reading_cancelled_by_script", "readings", None)
async def _(w: World) -> list[str]:
    keys = w.pick("readings")
    for k in keys:
        await w.set("IMRG", {"MDOCM": k}, CANCL="X")
    return keys


@kind("part_text_makt", "parts", None)
async def _(w: World) -> list[str]:
    keys = w.pick("parts")
    for k in keys:
        await w.set("MAKT", {"MATNR": k, "SPRAS": "E"}, MAKTX=f"Part text {w.next()}")
    return keys


@kind("part_flagged", "parts", "changes")
async def _(w: World) -> list[str]:
    keys = w.pick("parts")
    for k in keys:
        flag = w.rng.choice(("X", ""))
        await w.set("MARA", {"MATNR": k}, LVORM=flag, LAEDA=sap_day())
    return keys


@kind("stock_changed", "inventory", "snapshot")
async def _(w: World) -> list[str]:
    keys = w.pick("inventory")
    for k in keys:
        matnr, werks, lgort = k.split("/")
        await w.set("MARD", {"MATNR": matnr, "WERKS": werks, "LGORT": lgort},
                    LABST=w.rng.randrange(0, 500))  # fmt: skip
    return keys


@kind("po_line_changed", "purchase_orders", "lines")
async def _(w: World) -> list[str]:
    keys = w.pick("purchase_orders")
    for k in keys:
        await w.set("EKPO", {"EBELN": k, "EBELP": "00020"}, MENGE=w.rng.randrange(1, 99),
                    AEDAT=sap_day())  # fmt: skip
    return keys


@kind("po_header_changed", "purchase_orders", "changes")
async def _(w: World) -> list[str]:
    keys = w.pick("purchase_orders")
    for k in keys:
        await w.set("EKKO", {"EBELN": k}, LIFNR=f"{w.next():010d}", AEDAT=sap_day())
    return keys


@kind("po_currency_by_script", "purchase_orders", None)
async def _(w: World) -> list[str]:
    keys = w.pick("purchase_orders")
    for k in keys:
        await w.set("EKKO", {"EBELN": k}, WAERS=w.rng.choice(("EUR", "USD", "CHF")))
    return keys


# ---------------------------------------------------------------------- the truth


async def _all(w: World, table: str) -> list[Any]:
    t = w.sap.table(table)
    stmt = select(*t.c)
    if "MANDT" in t.c:
        stmt = stmt.where(t.c.MANDT == w.sap.client)
    async with w.sap.engine.connect() as conn:
        return list((await conn.execute(stmt)).mappings())


def _utc(day: str, hms: str) -> str | None:
    if day.strip() in {"", "00000000"}:
        return None
    local = datetime.strptime(day + (hms.strip() or "000000"), "%Y%m%d%H%M%S")
    at = local.replace(tzinfo=BERLIN).astimezone(UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.000Z")


async def truth(w: World) -> dict[str, dict[str, dict[str, Any]]]:
    """Per entity: remote id -> the fields the kinds change, as the tables say now."""
    t = {name: await _all(w, name) for name in (
        "AUFK", "AFIH", "AFKO", "ILOA", "JEST", "EQUI", "EQKT", "EQUZ", "IFLOT", "IFLOTX",
        "QMEL", "QMIH", "IMRG", "MARA", "MAKT", "MARD", "EKKO", "EKPO")}  # fmt: skip
    active: dict[str, list[str]] = {}
    for r in t["JEST"]:
        if not r["INACT"].strip():
            active.setdefault(r["OBJNR"].rstrip(), []).append(r["STAT"].strip())
    stats = {k: sorted(v) for k, v in active.items()}
    where = {r["ILOAN"]: text(r["TPLNR"]) for r in t["ILOA"]}

    def status(objnr: str) -> list[str]:
        return stats.get(objnr.rstrip(), [])

    afih = {r["AUFNR"]: r for r in t["AFIH"]}
    afko = {r["AUFNR"]: r for r in t["AFKO"]}
    orders = {}
    for r in t["AUFK"]:
        if r["AUTYP"] != "30":
            continue
        h, k, st = afih.get(r["AUFNR"]), afko.get(r["AUFNR"]), status(r["OBJNR"])
        orders[r["AUFNR"]] = {
            "op": "delete" if r["LOEKZ"].strip() or "I0076" in st else "upsert",
            "title": text(r["KTEXT"]),
            "sap_status": st,
            "asset_remote_id": text(h["EQUNR"]) if h else None,
            "location_remote_id": where.get(h["ILOAN"]) if h and h["ILOAN"].strip() else None,
            "planned_start": _utc(k["GSTRP"], k["GSUZP"]) if k else None,
            "zz_contract": text(r[Z_FIELD[1]]),
        }
    eqkt = {r["EQUNR"]: r["EQKTX"] for r in t["EQKT"] if r["SPRAS"] == "E"}
    equz = {r["EQUNR"]: r["ILOAN"] for r in t["EQUZ"] if r["DATBI"] == OPEN_END}
    assets = {}
    for r in t["EQUI"]:
        st = status(r["OBJNR"])
        assets[r["EQUNR"]] = {
            "op": "delete" if "I0076" in st else "upsert",
            "title": text(eqkt.get(r["EQUNR"])),
            "manufacturer": text(r["HERST"]),
            "location_remote_id": where.get(equz.get(r["EQUNR"], "")),
            "sap_status": st,
        }
    pltxt = {r["TPLNR"]: r["PLTXT"] for r in t["IFLOTX"] if r["SPRAS"] == "E"}
    locations = {
        r["TPLNR"]: {
            "op": "delete" if "I0076" in status(r["OBJNR"]) else "upsert",
            "title": text(pltxt.get(r["TPLNR"])),
            "sap_status": status(r["OBJNR"]),
        }
        for r in t["IFLOT"]
    }
    qmih = {r["QMNUM"]: r["EQUNR"] for r in t["QMIH"]}
    notifications = {
        r["QMNUM"]: {
            "op": "delete" if "I0076" in status(r["OBJNR"]) else "upsert",
            "title": text(r["QMTXT"]),
            "asset_remote_id": text(qmih.get(r["QMNUM"])),
            "sap_status": status(r["OBJNR"]),
        }
        for r in t["QMEL"]
    }
    readings = {
        r["MDOCM"]: {"op": "delete" if r["CANCL"].strip() else "upsert", "value": r["READG"]}
        for r in t["IMRG"]
    }
    makt = {r["MATNR"]: r["MAKTX"] for r in t["MAKT"] if r["SPRAS"] == "E"}
    parts = {
        r["MATNR"]: {
            "op": "delete" if r["LVORM"].strip() else "upsert",
            "title": text(makt.get(r["MATNR"])),
        }
        for r in t["MARA"]
    }
    inventory = {
        f"{r['MATNR']}/{r['WERKS']}/{r['LGORT']}": {
            "op": "delete" if r["LVORM"].strip() else "upsert",
            "quantity": str(Decimal(r["LABST"]).quantize(Decimal("0.001"))),
        }
        for r in t["MARD"]
    }
    lines: dict[str, list[tuple[str, str]]] = {}
    for r in sorted(t["EKPO"], key=lambda r: (r["EBELN"], r["EBELP"])):
        qty = str(Decimal(r["MENGE"]).quantize(Decimal("0.001")))
        lines.setdefault(r["EBELN"], []).append((r["EBELP"], qty))
    purchase_orders = {
        r["EBELN"]: {
            "op": "delete" if r["LOEKZ"].strip() else "upsert",
            "vendor_remote_id": text(r["LIFNR"]),
            "currency": text(r["WAERS"]),
            "lines": lines.get(r["EBELN"], []),
        }
        for r in t["EKKO"]
    }
    return {
        "work_orders": orders, "assets": assets, "locations": locations,
        "notifications": notifications, "readings": readings, "parts": parts,
        "inventory": inventory, "purchase_orders": purchase_orders,
    }  # fmt: skip


FIELDS = {
    "work_orders": ("title", "sap_status", "asset_remote_id", "location_remote_id",
                    "planned_start"),
    "assets": ("title", "manufacturer", "location_remote_id", "sap_status"),
    "locations": ("title", "sap_status"),
    "notifications": ("title", "asset_remote_id", "sap_status"),
    "readings": ("value",),
    "parts": ("title",),
    "inventory": ("quantity",),
    "purchase_orders": ("vendor_remote_id", "currency"),
}  # fmt: skip
"""The ``data`` fields :func:`truth` knows, per entity."""


def project(entity: str, record: dict[str, Any]) -> dict[str, Any]:
    """The fields of :func:`truth` as an upstream record carries them."""
    data = record["data"]
    out = {"op": record["op"], **{k: data.get(k) for k in FIELDS[entity]}}
    if entity == "work_orders":
        out["zz_contract"] = (record.get("custom") or {}).get("zz_contract")
    if entity == "purchase_orders":
        out["lines"] = [(x["line"], x["quantity"]) for x in data.get("lines") or []]
    return out


def differences(
    entity: str,
    expected: dict[str, dict[str, Any]],
    upstream: dict[str, dict[str, Any]],
    skip: set[str],
) -> list[str]:
    """What the upstream gets wrong: stale fields, missing entities, deleted ones live."""
    wrong: list[str] = []
    for rid, want in expected.items():
        if rid in skip:
            continue
        rec = upstream.get(rid)
        if rec is None:
            wrong.append(f"{entity} {rid}: missing upstream")
            continue
        got = project(entity, rec)
        for name, value in want.items():
            if got.get(name) != value:
                wrong.append(f"{entity} {rid}: {name} is {got.get(name)!r}, source {value!r}")
    for rid, rec in upstream.items():
        if rid not in expected and rid not in skip and rec["op"] != "delete":
            wrong.append(f"{entity} {rid}: deleted in the source, still live upstream")
    return wrong
