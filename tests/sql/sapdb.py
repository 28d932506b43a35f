"""SAP-shaped fixture tables (real names, DDIC lengths and types) for PostgreSQL/MariaDB."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Column, Float, MetaData, Numeric, String, Table, delete, insert
from sqlalchemy.ext.asyncio import AsyncEngine

from agent.sources.sql.profiles.sap_tables import _COLUMNS

LENGTHS = {
    "MANDT": 3, "EQUNR": 18, "EQTYP": 1, "EQART": 10, "HERST": 30, "TYPBZ": 20, "SERGE": 18,
    "OBJNR": 22, "SPRAS": 1, "EQKTX": 40, "EQLFN": 3, "ILOAN": 12, "HEQUI": 18, "IWERK": 4,
    "TPLNR": 30, "SWERK": 4, "STORT": 10, "FLTYP": 1, "TPLMA": 30, "PLTXT": 40, "AUFNR": 12,
    "AUART": 4, "AUTYP": 2, "KTEXT": 40, "WERKS": 4, "LOEKZ": 1, "PRIOK": 1, "QMNUM": 12,
    "QMART": 2, "QMTXT": 40, "STAT": 5, "INACT": 1, "CHGNR": 3, "USNAM": 12, "ISTAT": 5,
    "TXT04": 4, "TXT30": 30, "POINT": 12, "MPOBJ": 22, "PSORT": 20, "PTTXT": 40, "MSEHI": 3,
    "LVORM": 1, "MDOCM": 20, "RECDU": 3, "CANCL": 1, "MATNR": 18, "MTART": 4, "MATKL": 9,
    "MEINS": 3, "MAKTX": 40, "LGORT": 4, "EBELN": 10, "BUKRS": 4, "BSTYP": 1, "BSART": 4,
    "LIFNR": 10, "EKORG": 4, "WAERS": 5, "EBELP": 5, "TXZ01": 40, "MANDANT": 3,
    "OBJECTCLAS": 15, "OBJECTID": 90, "CHANGENR": 10, "USERNAME": 12, "TCODE": 20,
    "CHANGE_IND": 1,
}  # fmt: skip
DATES = {"ERDAT", "AEDAT", "INBDT", "DATBI", "GSTRP", "GLTRP", "QMDAT", "STRMN", "LTRMN",
         "UDATE", "IDATE", "ERSDA", "LAEDA", "BEDAT"}  # fmt: skip
TIMES = {"GSUZP", "GLUZP", "MZEIT", "UTIME", "ITIME"}
NUMBERS = {"LABST": Numeric(13, 3), "INSME": Numeric(13, 3), "SPEME": Numeric(13, 3),
           "MENGE": Numeric(13, 3), "NETPR": Numeric(11, 2), "PEINH": Numeric(5, 0)}  # fmt: skip
KEYS = {
    "EQUI": ("MANDT", "EQUNR"), "EQKT": ("MANDT", "EQUNR", "SPRAS"),
    "EQUZ": ("MANDT", "EQUNR", "DATBI", "EQLFN"), "ILOA": ("MANDT", "ILOAN"),
    "IFLOT": ("MANDT", "TPLNR"), "IFLOTX": ("MANDT", "TPLNR", "SPRAS"),
    "AUFK": ("MANDT", "AUFNR"), "AFIH": ("MANDT", "AUFNR"), "AFKO": ("MANDT", "AUFNR"),
    "QMEL": ("MANDT", "QMNUM"), "QMIH": ("MANDT", "QMNUM"), "JEST": ("MANDT", "OBJNR", "STAT"),
    "JCDS": ("MANDT", "OBJNR", "STAT", "CHGNR"), "TJ02T": ("ISTAT", "SPRAS"),
    "IMPTT": ("MANDT", "POINT"), "IMRG": ("MANDT", "MDOCM"), "MARA": ("MANDT", "MATNR"),
    "MAKT": ("MANDT", "MATNR", "SPRAS"), "MARD": ("MANDT", "MATNR", "WERKS", "LGORT"),
    "EKKO": ("MANDT", "EBELN"), "EKPO": ("MANDT", "EBELN", "EBELP"),
    "CDHDR": ("MANDANT", "OBJECTCLAS", "OBJECTID", "CHANGENR"),
}  # fmt: skip

# System status texts (TJ02T, language E) used by the fixtures.
STATUS_TEXTS = {"I0001": "CRTD", "I0002": "REL", "I0009": "CNF", "I0010": "PCNF",
                "I0045": "TECO", "I0046": "CLSD", "I0076": "DLFL", "I0068": "OSNO",
                "I0070": "NOPR", "I0072": "NOCO", "I0099": "AVLB", "I0100": "INST"}  # fmt: skip


def _column(table: str, name: str) -> Column[Any]:
    key = name in KEYS[table]
    if name == "READG":
        return Column(name, Float, nullable=False, server_default="0")
    if name in NUMBERS:
        return Column(name, NUMBERS[name], nullable=False, server_default="0")
    length = 8 if name in DATES else 6 if name in TIMES else LENGTHS.get(name, 20)
    default = "00000000" if name in DATES else "000000" if name in TIMES else " "
    return Column(name, String(length), primary_key=key, nullable=False, server_default=default)


def metadata(schema: str | None, extra: dict[str, tuple[str, ...]] | None = None) -> MetaData:
    """Every profile table, as SAP defines it (NVARCHAR-style, NOT NULL with defaults),
    plus ``extra`` customer fields (Z-fields) per table."""
    md = MetaData(schema=schema)
    for table, cols in _COLUMNS.items():
        Table(table, md, *(_column(table, c) for c in (*cols, *(extra or {}).get(table, ()))))
    return md


def _default(name: str) -> Any:
    if name in DATES:
        return "00000000"
    if name in TIMES:
        return "000000"
    if name in NUMBERS or name == "READG":
        return 0
    return ""


class SapDb:
    """Writes SAP rows the way SAP does (every column present, blanks not NULL)."""

    def __init__(
        self,
        engine: AsyncEngine,
        schema: str | None,
        client: str = "100",
        extra: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.engine = engine
        self.md = metadata(schema, extra)
        self.client = client

    async def create(self) -> None:
        """Create every table and the status texts."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self.md.create_all)
        await self.insert(
            "TJ02T", *[{"ISTAT": k, "SPRAS": "E", "TXT04": v, "TXT30": v}
                       for k, v in STATUS_TEXTS.items()]
        )  # fmt: skip

    def row(self, table: str, values: dict[str, Any]) -> dict[str, Any]:
        """A full row: defaults for every column, MANDT = the client."""
        out = {c.name: _default(c.name) for c in self.table(table).columns}
        for client in ("MANDT", "MANDANT"):  # CDHDR names its client column MANDANT
            if client in out:
                out[client] = self.client
        out.update(values)
        return out

    async def insert(self, table: str, *rows: dict[str, Any]) -> None:
        """Insert rows (missing columns get SAP defaults)."""
        async with self.engine.begin() as conn:
            await conn.execute(insert(self.md.tables[self._name(table)]),
                               [self.row(table, r) for r in rows])  # fmt: skip

    def table(self, name: str) -> Table:
        """The fixture table object (for updates and deletes)."""
        return self.md.tables[self._name(name)]

    def _name(self, table: str) -> str:
        return f"{self.md.schema}.{table}" if self.md.schema else table

    async def execute(self, stmt: Any) -> None:
        """Run one write statement in its own transaction."""
        async with self.engine.begin() as conn:
            await conn.execute(stmt)

    # -- SAP objects --------------------------------------------------------

    async def order(self, aufnr: str, *, ktext: str = "Order", aedat: str = "00000000",
                    erdat: str = "20260101", status: tuple[str, ...] = ("I0002",),
                    equnr: str = "", tplnr: str = "", autyp: str = "30", loekz: str = "",
                    gstrp: str = "00000000", gsuzp: str = "000000", mandt: str | None = None,
                    ) -> str:  # fmt: skip
        """A maintenance order (AUFK+AFIH+AFKO, ILOA when located, JEST statuses)."""
        objnr = f"OR{aufnr}"
        client = mandt or self.client
        iloan = f"L{aufnr[-10:]}" if tplnr else ""
        await self.insert("AUFK", {"MANDT": client, "AUFNR": aufnr, "AUART": "PM01",
                                   "AUTYP": autyp, "KTEXT": ktext, "ERDAT": erdat,
                                   "AEDAT": aedat, "WERKS": "1000", "OBJNR": objnr,
                                   "LOEKZ": loekz})  # fmt: skip
        await self.insert("AFIH", {"MANDT": client, "AUFNR": aufnr, "EQUNR": equnr,
                                   "ILOAN": iloan, "PRIOK": "2", "IWERK": "1000"})  # fmt: skip
        await self.insert("AFKO", {"MANDT": client, "AUFNR": aufnr, "GSTRP": gstrp,
                                   "GSUZP": gsuzp})  # fmt: skip
        if tplnr:
            await self.insert("ILOA", {"MANDT": client, "ILOAN": iloan, "TPLNR": tplnr})
        if status:
            await self.insert("JEST", *[{"MANDT": client, "OBJNR": objnr, "STAT": s,
                                         "CHGNR": "001"} for s in status])  # fmt: skip
        return objnr

    async def set_status(
        self, objnr: str, stat: str, chgnr: str, at: datetime, *, active: bool = True
    ) -> None:
        """Set (``active``) or revoke a system status as SAP does: JEST holds the current
        state (INACT X when revoked, CHGNR the latest change), JCDS one row per change."""
        jest = self.table("JEST")
        inact = "" if active else "X"
        current = {"OBJNR": objnr, "STAT": stat, "INACT": inact, "CHGNR": chgnr}
        change = {**current, "UDATE": at.strftime("%Y%m%d"), "UTIME": at.strftime("%H%M%S")}
        mine = (jest.c.MANDT == self.client, jest.c.OBJNR == objnr, jest.c.STAT == stat)
        async with self.engine.begin() as conn:
            await conn.execute(delete(jest).where(*mine))
            await conn.execute(insert(jest), [self.row("JEST", current)])
            await conn.execute(insert(self.table("JCDS")), [self.row("JCDS", change)])

    async def change_document(
        self, objectclas: str, objectid: str, changenr: str, at: datetime, *, client: str = ""
    ) -> None:
        """A CDHDR row, as SAP's update task writes it after a change of the object."""
        row = {
            "MANDANT": client or self.client,
            "OBJECTCLAS": objectclas,
            "OBJECTID": objectid,
            "CHANGENR": changenr,
            "USERNAME": "JDOE",
            "UDATE": at.strftime("%Y%m%d"),
            "UTIME": at.strftime("%H%M%S"),
            "TCODE": "IE02",
            "CHANGE_IND": "U",
        }
        await self.insert("CDHDR", row)

    def order_objectid(self, aufnr: str) -> str:
        """An ORDER change document's OBJECTID: five characters, then AUFNR (SAP's CDS view
        reads AUFNR at offset 6; what the five hold is not documented: client + 'OR' here)."""
        return f"{self.client}OR{aufnr}"

    async def equipment(self, equnr: str, *, text: str = "Lift", tplnr: str = "",
                        aedat: str = "00000000", erdat: str = "20260101",
                        status: tuple[str, ...] = ("I0100",)) -> str:  # fmt: skip
        """A piece of equipment (EQUI+EQKT, an open EQUZ time segment with its ILOA)."""
        objnr = f"IE{equnr}"
        iloan = f"E{equnr[-11:]}"
        await self.insert("EQUI", {"EQUNR": equnr, "ERDAT": erdat, "AEDAT": aedat,
                                   "EQTYP": "M", "OBJNR": objnr})  # fmt: skip
        await self.insert("EQKT", {"EQUNR": equnr, "SPRAS": "E", "EQKTX": text})
        await self.insert("EQUZ", {"EQUNR": equnr, "DATBI": "99991231", "EQLFN": "001",
                                   "ILOAN": iloan, "IWERK": "1000"})  # fmt: skip
        await self.insert("ILOA", {"ILOAN": iloan, "TPLNR": tplnr, "SWERK": "1000"})
        if status:
            await self.insert("JEST", *[{"OBJNR": objnr, "STAT": s, "CHGNR": "001"}
                                        for s in status])  # fmt: skip
        return objnr
