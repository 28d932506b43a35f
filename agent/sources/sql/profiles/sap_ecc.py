"""The ``sap_ecc`` profile: plant maintenance, materials and purchasing tables of SAP ECC.

Entities (``include`` selects a subset):

============== ====================== ===================================================
entity         unified type           tables
============== ====================== ===================================================
assets         asset                  EQUI, EQKT, EQUZ, ILOA + status JEST/TJ02T/JCDS
locations      location               IFLOT, IFLOTX, ILOA + status
work_orders    work_order             AUFK (AUTYP 30), AFIH, AFKO, ILOA + status
notifications  maintenance_request    QMEL, QMIH, ILOA + status
readings       meter_reading          IMRG, IMPTT
parts          part                   MARA, MAKT
inventory      inventory_level        MARD (no change date: compared whole each pass)
purchase_orders purchase_order        EKKO, EKPO (lines)
============== ====================== ===================================================

Change detection: ``max(AEDAT, ERDAT)`` (day precision, re-read with one day of overlap
and deduplicated by content hash) plus, for status-managed objects, the status change
documents JCDS (``UDATE``/``UTIME``; a status set and a status revoked are both rows), so
a status-only change is seen although AEDAT did not move; with ``change_documents`` on,
the change document headers CDHDR too, which name objects whose child tables (EQKT,
EQUZ/ILOA, AFIH, QMIH) changed. Deletion: ``LOEKZ``/``LVORM``/``CANCL`` flags or the
system status DLFL give ``op = delete``, and clearing them an upsert again; hard deletes
are found by reconciliation (the table in docs/sql-sources.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, FromClause, String, and_, case, or_, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import GenericFunction

from agent.records import EntityType, Op, format_time
from agent.sources.sql.config import SqlSourceConfig
from agent.sources.sql.engine import Database
from agent.sources.sql.model import EntitySpec, Feed, Mapped, Row
from agent.sources.sql.profiles.sap_tables import (
    _COLUMNS,
    OPEN_END,
    Tables,
    day_start,
    flag,
    sap_date,
    sap_datetime,
    text,
)

DAY = 86400.0
# Update tasks commit JCDS and CDHDR rows a little after their UDATE/UTIME: re-read
# the last hour on every pass.
STATUS_OVERLAP = 3600.0
IN_BATCH = 500  # IN-list size (SQL Server allows 2100 parameters)
DLFL = "I0076"

CHANGE_DOCUMENT_CLASSES = {"assets": "EQUI", "locations": "IFLO", "work_orders": "ORDER",
                           "notifications": "QMEL"}  # fmt: skip
"""CDHDR object class per entity (docs/sql-sources.md says where each comes from)."""
ORDER_ID_START, ORDER_ID_LENGTH = 6, 12
"""Where AUFNR sits in an ORDER change document's OBJECTID: SAP's released CDS view
I_MaintOrdChangeDocumentDEX joins ``substring(ObjectID, 6, 12)`` to the order number."""


class substr(GenericFunction[str]):
    """``SUBSTR(text, start, length)``; SQL Server spells it ``SUBSTRING``."""

    type = String()
    inherit_cache = True


@compiles(substr, "mssql")
def _substring(element: substr, compiler: SQLCompiler, **kw: Any) -> str:
    return f"SUBSTRING({compiler.process(element.clauses, **kw)})"


# Unified status from SAP system statuses (internal codes, language-independent),
# first match wins.
ORDER_STATUS = (("I0076", "deleted"), ("I0046", "closed"), ("I0045", "completed"),
                ("I0009", "completed"), ("I0010", "in_progress"), ("I0002", "released"),
                ("I0001", "created"))  # fmt: skip
NOTIF_STATUS = (("I0076", "deleted"), ("I0072", "completed"), ("I0071", "in_progress"),
                ("I0070", "in_progress"), ("I0068", "open"))  # fmt: skip
TECH_STATUS = (("I0076", "deleted"), ("I0320", "inactive"), ("I0100", "installed"),
               ("I0099", "available"))  # fmt: skip


def _unified(codes: Sequence[str], table: tuple[tuple[str, str], ...], default: str) -> str:
    for code, name in table:
        if code in codes:
            return name
    return default


def _modified(row: Row, tz: ZoneInfo) -> Any:
    m = str(row.get("_m") or "")
    if len(m) == 14:
        return sap_datetime(m[:8], m[8:], tz)
    return day_start(m, tz)


def _iso(value: object) -> str | None:
    d = sap_date(value)
    return None if d is None else d.isoformat()


def _ts(day: object, time: object, tz: ZoneInfo) -> str | None:
    at = sap_datetime(day, time, tz)
    return None if at is None else format_time(at)


class StatusLookup:
    """Active system statuses of objects (JEST), with their texts (TJ02T), per chunk."""

    def __init__(self, db: Database, t: Tables, client: str, language: str) -> None:
        self.db, self.t, self.client, self.language = db, t, client, language
        self._texts: dict[str, str] | None = None

    async def texts(self) -> dict[str, str]:
        """ISTAT -> TXT04 (e.g. I0002 -> REL), loaded once per source run."""
        if self._texts is None:
            tj = self.t.TJ02T
            rows = await self.db.fetch(
                select(tj.c.ISTAT, tj.c.TXT04).where(tj.c.SPRAS == self.language)
            )
            self._texts = {str(r["ISTAT"]).strip(): str(r["TXT04"]).strip() for r in rows}
        return self._texts

    async def __call__(self, rows: Sequence[Row]) -> dict[str, list[str]]:
        """OBJNR -> sorted active status codes, for the objects of ``rows``."""
        objnrs = sorted({str(r["OBJNR"]) for r in rows if r.get("OBJNR")})
        out: dict[str, list[str]] = {o.rstrip(): [] for o in objnrs}
        j = self.t.JEST
        for i in range(0, len(objnrs), IN_BATCH):
            stmt = select(j.c.OBJNR, j.c.STAT).where(
                j.c.MANDT == self.client,
                j.c.OBJNR.in_(objnrs[i : i + IN_BATCH]),
                or_(j.c.INACT == "", j.c.INACT == " ", j.c.INACT.is_(None)),
            )
            for r in await self.db.fetch(stmt):
                out.setdefault(str(r["OBJNR"]).rstrip(), []).append(str(r["STAT"]).strip())
        return {k: sorted(v) for k, v in out.items()}


HEADERS = {"assets": "EQUI", "locations": "IFLOT", "work_orders": "AUFK",
           "notifications": "QMEL", "readings": "IMRG", "parts": "MARA", "inventory": "MARD",
           "purchase_orders": "EKKO"}  # fmt: skip
"""The table of each entity that customer fields (CI_AUFK, CI_EQUI ... includes) extend."""
_STANDARD = {c.upper() for cols in _COLUMNS.values() for c in cols}
_FIELD_NAME = re.compile(r"^[A-Za-z_/][A-Za-z0-9_/]*$")


def customer_fields(config: SqlSourceConfig) -> dict[str, list[str]]:
    """Columns ``mappings.<entity>.custom`` names that no profile table has: Z-fields of the
    entity's header table, selected with it (so ``custom = { zz_contract = "ZZCONTRACT" }``
    reads AUFK.ZZCONTRACT). Standard columns come from the tables that hold them already."""
    out: dict[str, list[str]] = {}
    for entity, fmap in config.mappings.items():
        table = HEADERS.get(entity)
        if table is None:
            continue
        for col in fmap.custom.values():
            name = col.upper()
            mine = out.setdefault(table, [])
            if name not in _STANDARD and _FIELD_NAME.match(name) and name not in mine:
                mine.append(name)
    return out


class _Builder:
    """Shared pieces of every SAP entity: client filter, change feeds, status feed."""

    def __init__(self, config: SqlSourceConfig, db: Database) -> None:
        self.t = Tables(config.db_schema, customer_fields(config))
        self.client = config.client
        wanted = config.change_documents
        self.change_documents = (
            set(CHANGE_DOCUMENT_CLASSES) if wanted is True else set(wanted or ())
        )
        self.lang = config.language
        self.tz = ZoneInfo(config.timezone)
        self.status = StatusLookup(db, self.t, config.client, config.language)

    def changed(self, created: ColumnElement[Any], changed: ColumnElement[Any]) -> Any:
        """``max(changed, created)``: '00000000' sorts before any real date."""
        return case((changed > created, changed), else_=created)

    def feeds(
        self,
        *,
        cols: Sequence[ColumnElement[Any]],
        joined: FromClause,
        where: Sequence[ColumnElement[bool]],
        mod: ColumnElement[Any],
        keys: tuple[ColumnElement[Any], ...],
        objnr: ColumnElement[Any] | None,
        mandt: ColumnElement[Any],
        documents: ColumnElement[bool] | None = None,
    ) -> tuple[Feed, ...]:
        """The AEDAT feed; the JCDS feed when the object is status-managed; the CDHDR
        feed when change documents are on (``documents``: how a CDHDR row names it)."""
        base = select(*cols).select_from(joined).where(*where)
        feeds = [Feed("changes", base, mod, keys, "sap_date", DAY)]
        if objnr is not None:
            # Every JCDS row is a change, a status set (INACT blank) or revoked (INACT X):
            # either re-reads the object, whose active set then comes from JEST.
            jc = self.t.JCDS
            on = and_(mandt == jc.c.MANDT, objnr == jc.c.OBJNR)
            status = select(*cols).select_from(joined.join(jc, on)).where(*where)
            feeds.append(
                Feed(
                    "status",
                    status,
                    jc.c.UDATE.concat(jc.c.UTIME),
                    (jc.c.OBJNR, jc.c.STAT, jc.c.CHGNR),
                    "sap_datetime",
                    STATUS_OVERLAP,
                    day=jc.c.UDATE,
                    trigger=True,
                )
            )
        if documents is not None:
            cd = self.t.CDHDR
            on = and_(mandt == cd.c.MANDANT, documents)
            changed = (
                select(*cols)
                .select_from(joined.join(cd, on))
                .where(*where, cd.c.MANDANT == self.client)
            )
            feeds.append(
                Feed(
                    "change_documents",
                    changed,
                    cd.c.UDATE.concat(cd.c.UTIME),
                    (cd.c.OBJECTID, cd.c.CHANGENR),
                    "sap_datetime",
                    STATUS_OVERLAP,
                    day=cd.c.UDATE,
                    trigger=True,
                )
            )
        return tuple(feeds)

    def documents(self, entity: str, key: ColumnElement[Any]) -> ColumnElement[bool] | None:
        """How a CDHDR row names an object of ``entity`` (None: change documents off)."""
        if entity not in self.change_documents:
            return None
        cd = self.t.CDHDR
        objectid: ColumnElement[Any] = cd.c.OBJECTID
        if entity == "work_orders":
            objectid = substr(objectid, ORDER_ID_START, ORDER_ID_LENGTH)
        return and_(cd.c.OBJECTCLAS == CHANGE_DOCUMENT_CLASSES[entity], objectid == key)

    def spec(  # noqa: PLR0917 - each entity reads as one row of arguments
        self,
        name: str,
        etype: EntityType,
        cols: Sequence[ColumnElement[Any]],
        joined: FromClause,
        where: Sequence[ColumnElement[bool]],
        keys: tuple[ColumnElement[Any], ...],
        mod: ColumnElement[Any],
        mapper: Callable[[Row, Any], Mapped],
        *,
        mandt: ColumnElement[Any],
        objnr: ColumnElement[Any] | None = None,
        enrich: Any = None,
        snapshot: bool = False,
    ) -> EntitySpec:
        """Assemble an entity spec; ``where`` includes the client filter."""
        if snapshot:
            base = select(*cols).select_from(joined).where(*where)
            feeds: tuple[Feed, ...] = (
                Feed("snapshot", base, keys[0], keys[1:], "text", snapshot=True),
            )
        else:
            feeds = self.feeds(
                cols=cols, joined=joined, where=where, mod=mod, keys=keys, objnr=objnr,
                mandt=mandt, documents=self.documents(name, keys[0]),
            )  # fmt: skip
        if enrich is None and objnr is not None:
            enrich = self.status
        return EntitySpec(
            name=name,
            entity_type=etype,
            feeds=feeds,
            key_columns=keys,
            key_select=select(*keys).select_from(joined).where(*where),
            mapper=mapper,
            remote_id=lambda values: "/".join(str(v).rstrip() for v in values),
            enrich=enrich,
            precision="day",
            system="sap_ecc",
        )


def _status_of(row: Row, ctx: Any) -> list[str]:
    objnr = str(row.get("OBJNR") or "").rstrip()
    return list((ctx or {}).get(objnr, []))


def assets(b: _Builder) -> EntitySpec:
    """Equipment (EQUI) with its text, current time segment and location."""
    t = b.t
    e, k, z, lo = t.EQUI, t.EQKT, t.EQUZ, t.ILOA
    joined = (
        e.outerjoin(k, and_(k.c.MANDT == e.c.MANDT, k.c.EQUNR == e.c.EQUNR, k.c.SPRAS == b.lang))
        .outerjoin(z, and_(z.c.MANDT == e.c.MANDT, z.c.EQUNR == e.c.EQUNR, z.c.DATBI == OPEN_END))
        .outerjoin(lo, and_(lo.c.MANDT == z.c.MANDT, lo.c.ILOAN == z.c.ILOAN))
    )
    cols = [*e.c, k.c.EQKTX, z.c.ILOAN, z.c.HEQUI, z.c.IWERK, lo.c.TPLNR, lo.c.SWERK]

    def mapper(row: Row, ctx: Any) -> Mapped:
        codes = _status_of(row, ctx)
        data = {
            "title": text(row["EQKTX"]),
            "asset_type": text(row["EQTYP"]),
            "category": text(row["EQART"]),
            "manufacturer": text(row["HERST"]),
            "model": text(row["TYPBZ"]),
            "serial_number": text(row["SERGE"]),
            "commissioned_on": _iso(row["INBDT"]),
            "created_on": _iso(row["ERDAT"]),
            "location_remote_id": text(row["TPLNR"]),
            "parent_asset_remote_id": text(row["HEQUI"]),
            "plant": text(row["IWERK"]) or text(row["SWERK"]),
            "status": _unified(codes, TECH_STATUS, "active"),
            "sap_status": codes,
        }
        op = Op.DELETE if DLFL in codes else Op.UPSERT
        return Mapped(str(row["EQUNR"]).rstrip(), data, op, _modified(row, b.tz))

    return b.spec(
        "assets", EntityType.ASSET, cols, joined, [e.c.MANDT == b.client], (e.c.EQUNR,),
        b.changed(e.c.ERDAT, e.c.AEDAT), mapper, mandt=e.c.MANDT, objnr=e.c.OBJNR,
    )  # fmt: skip


def locations(b: _Builder) -> EntitySpec:
    """Functional locations (IFLOT) with text and location data."""
    t = b.t
    f, x, lo = t.IFLOT, t.IFLOTX, t.ILOA
    joined = f.outerjoin(
        x, and_(x.c.MANDT == f.c.MANDT, x.c.TPLNR == f.c.TPLNR, x.c.SPRAS == b.lang)
    ).outerjoin(lo, and_(lo.c.MANDT == f.c.MANDT, lo.c.ILOAN == f.c.ILOAN))
    cols = [*f.c, x.c.PLTXT, lo.c.SWERK, lo.c.STORT]

    def mapper(row: Row, ctx: Any) -> Mapped:
        codes = _status_of(row, ctx)
        data = {
            "title": text(row["PLTXT"]),
            "location_type": text(row["FLTYP"]),
            "parent_location_remote_id": text(row["TPLMA"]),
            "plant": text(row["IWERK"]) or text(row["SWERK"]),
            "site_location": text(row["STORT"]),
            "created_on": _iso(row["ERDAT"]),
            "status": _unified(codes, TECH_STATUS, "active"),
            "sap_status": codes,
        }
        op = Op.DELETE if DLFL in codes else Op.UPSERT
        return Mapped(str(row["TPLNR"]).rstrip(), data, op, _modified(row, b.tz))

    return b.spec(
        "locations", EntityType.LOCATION, cols, joined, [f.c.MANDT == b.client], (f.c.TPLNR,),
        b.changed(f.c.ERDAT, f.c.AEDAT), mapper, mandt=f.c.MANDT, objnr=f.c.OBJNR,
    )  # fmt: skip


def work_orders(b: _Builder) -> EntitySpec:
    """Maintenance orders: AUFK (order category 30) with AFIH, AFKO and location."""
    t = b.t
    a, h, k, lo = t.AUFK, t.AFIH, t.AFKO, t.ILOA
    joined = (
        a.outerjoin(h, and_(h.c.MANDT == a.c.MANDT, h.c.AUFNR == a.c.AUFNR))
        .outerjoin(k, and_(k.c.MANDT == a.c.MANDT, k.c.AUFNR == a.c.AUFNR))
        .outerjoin(lo, and_(lo.c.MANDT == h.c.MANDT, lo.c.ILOAN == h.c.ILOAN))
    )
    cols = [*a.c, h.c.EQUNR, h.c.ILOAN, h.c.PRIOK, h.c.QMNUM, h.c.IWERK, k.c.GSTRP,
            k.c.GLTRP, k.c.GSUZP, k.c.GLUZP, lo.c.TPLNR]  # fmt: skip

    def mapper(row: Row, ctx: Any) -> Mapped:
        codes = _status_of(row, ctx)
        data = {
            "title": text(row["KTEXT"]),
            "order_type": text(row["AUART"]),
            "status": _unified(codes, ORDER_STATUS, "created"),
            "sap_status": codes,
            "priority": text(row["PRIOK"]),
            "asset_remote_id": text(row["EQUNR"]),
            "location_remote_id": text(row["TPLNR"]),
            "maintenance_request_remote_id": text(row["QMNUM"]),
            "plant": text(row["IWERK"]) or text(row["WERKS"]),
            "planned_start": _ts(row["GSTRP"], row["GSUZP"], b.tz),
            "planned_end": _ts(row["GLTRP"], row["GLUZP"], b.tz),
            "created_on": _iso(row["ERDAT"]),
        }
        gone = flag(row["LOEKZ"]) or DLFL in codes
        return Mapped(
            str(row["AUFNR"]).rstrip(), data, Op.DELETE if gone else Op.UPSERT,
            _modified(row, b.tz),
        )  # fmt: skip

    where = [a.c.MANDT == b.client, a.c.AUTYP == "30"]
    return b.spec(
        "work_orders", EntityType.WORK_ORDER, cols, joined, where, (a.c.AUFNR,),
        b.changed(a.c.ERDAT, a.c.AEDAT), mapper, mandt=a.c.MANDT, objnr=a.c.OBJNR,
    )  # fmt: skip


def notifications(b: _Builder) -> EntitySpec:
    """Maintenance notifications: QMEL with QMIH and location."""
    t = b.t
    q, i, lo = t.QMEL, t.QMIH, t.ILOA
    joined = q.outerjoin(i, and_(i.c.MANDT == q.c.MANDT, i.c.QMNUM == q.c.QMNUM)).outerjoin(
        lo, and_(lo.c.MANDT == i.c.MANDT, lo.c.ILOAN == i.c.ILOAN)
    )
    cols = [*q.c, i.c.EQUNR, i.c.ILOAN, lo.c.TPLNR]

    def mapper(row: Row, ctx: Any) -> Mapped:
        codes = _status_of(row, ctx)
        data = {
            "title": text(row["QMTXT"]),
            "request_type": text(row["QMART"]),
            "status": _unified(codes, NOTIF_STATUS, "open"),
            "sap_status": codes,
            "priority": text(row["PRIOK"]),
            "asset_remote_id": text(row["EQUNR"]),
            "location_remote_id": text(row["TPLNR"]),
            "work_order_remote_id": text(row["AUFNR"]),
            "reported_at": _ts(row["QMDAT"], row["MZEIT"], b.tz),
            "required_start": _iso(row["STRMN"]),
            "required_end": _iso(row["LTRMN"]),
            "created_on": _iso(row["ERDAT"]),
        }
        op = Op.DELETE if DLFL in codes else Op.UPSERT
        return Mapped(str(row["QMNUM"]).rstrip(), data, op, _modified(row, b.tz))

    return b.spec(
        "notifications", EntityType.MAINTENANCE_REQUEST, cols, joined,
        [q.c.MANDT == b.client], (q.c.QMNUM,), b.changed(q.c.ERDAT, q.c.AEDAT), mapper,
        mandt=q.c.MANDT, objnr=q.c.OBJNR,
    )  # fmt: skip


def readings(b: _Builder) -> EntitySpec:
    """Measurement documents (IMRG) with their measuring point (IMPTT)."""
    t = b.t
    r, p = t.IMRG, t.IMPTT
    joined = r.outerjoin(p, and_(p.c.MANDT == r.c.MANDT, p.c.POINT == r.c.POINT))
    cols = [*r.c, p.c.MPOBJ, p.c.PSORT, p.c.PTTXT, p.c.MSEHI]

    def mapper(row: Row, _ctx: Any) -> Mapped:
        data = {
            "point_remote_id": text(row["POINT"]),
            "point_title": text(row["PTTXT"]),
            "object_number": text(row["MPOBJ"]),
            "value": row["READG"],
            "unit": text(row["RECDU"]) or text(row["MSEHI"]),
            "measured_at": _ts(row["IDATE"], row["ITIME"], b.tz),
        }
        op = Op.DELETE if flag(row["CANCL"]) else Op.UPSERT
        return Mapped(str(row["MDOCM"]).rstrip(), data, op, _modified(row, b.tz))

    # A cancellation sets CANCL and AEDAT, not ERDAT: without AEDAT it was never seen.
    return b.spec(
        "readings", EntityType.METER_READING, cols, joined, [r.c.MANDT == b.client],
        (r.c.MDOCM,), b.changed(r.c.ERDAT, r.c.AEDAT), mapper, mandt=r.c.MANDT,
    )  # fmt: skip


def parts(b: _Builder) -> EntitySpec:
    """Materials (MARA) with their description (MAKT)."""
    t = b.t
    m, k = t.MARA, t.MAKT
    joined = m.outerjoin(
        k, and_(k.c.MANDT == m.c.MANDT, k.c.MATNR == m.c.MATNR, k.c.SPRAS == b.lang)
    )
    cols = [*m.c, k.c.MAKTX]

    def mapper(row: Row, _ctx: Any) -> Mapped:
        data = {
            "title": text(row["MAKTX"]),
            "part_type": text(row["MTART"]),
            "group": text(row["MATKL"]),
            "unit": text(row["MEINS"]),
            "created_on": _iso(row["ERSDA"]),
        }
        op = Op.DELETE if flag(row["LVORM"]) else Op.UPSERT
        return Mapped(str(row["MATNR"]).rstrip(), data, op, _modified(row, b.tz))

    return b.spec(
        "parts", EntityType.PART, cols, joined, [m.c.MANDT == b.client], (m.c.MATNR,),
        b.changed(m.c.ERSDA, m.c.LAEDA), mapper, mandt=m.c.MANDT,
    )  # fmt: skip


def inventory(b: _Builder) -> EntitySpec:
    """Storage location stock (MARD). MARD has no change date: each pass compares all."""
    d = b.t.MARD

    def mapper(row: Row, _ctx: Any) -> Mapped:
        rid = "/".join(str(row[c]).rstrip() for c in ("MATNR", "WERKS", "LGORT"))
        data = {
            "part_remote_id": text(row["MATNR"]),
            "plant": text(row["WERKS"]),
            "storage_location": text(row["LGORT"]),
            "quantity": row["LABST"],
            "quality_inspection": row["INSME"],
            "blocked": row["SPEME"],
        }
        return Mapped(rid, data, Op.DELETE if flag(row["LVORM"]) else Op.UPSERT)

    return b.spec(
        "inventory", EntityType.INVENTORY_LEVEL, list(d.c), d, [d.c.MANDT == b.client],
        (d.c.MATNR, d.c.WERKS, d.c.LGORT), d.c.MATNR, mapper, mandt=d.c.MANDT, snapshot=True,
    )  # fmt: skip


def _line(row: Row) -> dict[str, Any]:
    return {
        "line": text(row["EBELP"]),
        "text": text(row["TXZ01"]),
        "part_remote_id": text(row["MATNR"]),
        "plant": text(row["WERKS"]),
        "storage_location": text(row["LGORT"]),
        "quantity": row["MENGE"],
        "unit": text(row["MEINS"]),
        "net_price": row["NETPR"],
        "price_unit": row["PEINH"],
        "deleted": flag(row["LOEKZ"]),
    }


def purchase_orders(b: _Builder, db: Database) -> EntitySpec:
    """Purchase orders: EKKO headers with their EKPO lines (a line change is seen too)."""
    t = b.t
    h, p = t.EKKO, t.EKPO
    where = [h.c.MANDT == b.client]

    async def lines(rows: Sequence[Row]) -> dict[str, list[dict[str, Any]]]:
        ebelns = sorted({str(r["EBELN"]) for r in rows})
        out: dict[str, list[dict[str, Any]]] = {}
        for i in range(0, len(ebelns), IN_BATCH):
            stmt = (
                select(*p.c)
                .where(p.c.MANDT == b.client, p.c.EBELN.in_(ebelns[i : i + IN_BATCH]))
                .order_by(p.c.EBELN, p.c.EBELP)
            )
            for r in await db.fetch(stmt):
                out.setdefault(str(r["EBELN"]).rstrip(), []).append(_line(r))
        return out

    def mapper(row: Row, ctx: Any) -> Mapped:
        rid = str(row["EBELN"]).rstrip()
        data = {
            "order_type": text(row["BSART"]),
            "company_code": text(row["BUKRS"]),
            "vendor_remote_id": text(row["LIFNR"]),
            "purchasing_org": text(row["EKORG"]),
            "currency": text(row["WAERS"]),
            "ordered_on": _iso(row["BEDAT"]),
            "lines": (ctx or {}).get(rid, []),
        }
        op = Op.DELETE if flag(row["LOEKZ"]) else Op.UPSERT
        return Mapped(rid, data, op, _modified(row, b.tz))

    head = select(*h.c).select_from(h).where(*where)
    by_line = (
        select(*h.c)
        .select_from(p.join(h, and_(h.c.MANDT == p.c.MANDT, h.c.EBELN == p.c.EBELN)))
        .where(*where)
    )
    feeds = (
        Feed("changes", head, h.c.AEDAT, (h.c.EBELN,), "sap_date", DAY),
        Feed("lines", by_line, p.c.AEDAT, (p.c.EBELN, p.c.EBELP), "sap_date", DAY),
    )
    return EntitySpec(
        name="purchase_orders",
        entity_type=EntityType.PURCHASE_ORDER,
        feeds=feeds,
        key_columns=(h.c.EBELN,),
        key_select=select(h.c.EBELN).where(*where),
        mapper=mapper,
        remote_id=lambda values: "/".join(str(v).rstrip() for v in values),
        enrich=lines,
        precision="day",
        system="sap_ecc",
    )


def specs(config: SqlSourceConfig, db: Database) -> list[EntitySpec]:
    """Every entity of the SAP ECC profile."""
    b = _Builder(config, db)
    return [
        assets(b),
        locations(b),
        work_orders(b),
        notifications(b),
        readings(b),
        parts(b),
        inventory(b),
        purchase_orders(b, db),
    ]
