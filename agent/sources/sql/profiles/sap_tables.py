"""SAP ECC tables read by the ``sap_ecc`` profile, and SAP value conventions.

Dates are CHAR(8) ``YYYYMMDD`` with ``'00000000'`` (or blanks) for "no date", times are
CHAR(6) ``HHMMSS`` in the application server's local time, keys are zero-padded CHAR
fields (kept as they are in ``remote_id``), and every client-dependent table starts with
the client ``MANDT``.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

from sqlalchemy import TableClause, column, table

_COLUMNS: dict[str, tuple[str, ...]] = {
    "EQUI": ("MANDT", "EQUNR", "ERDAT", "AEDAT", "EQTYP", "EQART", "HERST", "TYPBZ", "SERGE",
             "INBDT", "OBJNR"),
    "EQKT": ("MANDT", "EQUNR", "SPRAS", "EQKTX"),
    "EQUZ": ("MANDT", "EQUNR", "DATBI", "EQLFN", "ILOAN", "HEQUI", "IWERK"),
    "ILOA": ("MANDT", "ILOAN", "TPLNR", "SWERK", "STORT"),
    "IFLOT": ("MANDT", "TPLNR", "FLTYP", "ERDAT", "AEDAT", "OBJNR", "TPLMA", "ILOAN", "IWERK"),
    "IFLOTX": ("MANDT", "TPLNR", "SPRAS", "PLTXT"),
    "AUFK": ("MANDT", "AUFNR", "AUART", "AUTYP", "KTEXT", "ERDAT", "AEDAT", "WERKS", "OBJNR",
             "LOEKZ"),
    "AFIH": ("MANDT", "AUFNR", "EQUNR", "ILOAN", "PRIOK", "QMNUM", "IWERK"),
    "AFKO": ("MANDT", "AUFNR", "GSTRP", "GLTRP", "GSUZP", "GLUZP"),
    "QMEL": ("MANDT", "QMNUM", "QMART", "QMTXT", "ERDAT", "AEDAT", "PRIOK", "OBJNR", "AUFNR",
             "QMDAT", "MZEIT", "STRMN", "LTRMN"),
    "QMIH": ("MANDT", "QMNUM", "EQUNR", "ILOAN"),
    "JEST": ("MANDT", "OBJNR", "STAT", "INACT", "CHGNR"),
    "JCDS": ("MANDT", "OBJNR", "STAT", "CHGNR", "UDATE", "UTIME", "INACT", "USNAM"),
    "TJ02T": ("ISTAT", "SPRAS", "TXT04", "TXT30"),
    "IMPTT": ("MANDT", "POINT", "MPOBJ", "PSORT", "PTTXT", "MSEHI", "ERDAT", "AEDAT", "LVORM"),
    "IMRG": ("MANDT", "MDOCM", "POINT", "IDATE", "ITIME", "READG", "RECDU", "ERDAT", "AEDAT",
             "CANCL"),
    "MARA": ("MANDT", "MATNR", "MTART", "MATKL", "MEINS", "ERSDA", "LAEDA", "LVORM"),
    "MAKT": ("MANDT", "MATNR", "SPRAS", "MAKTX"),
    "MARD": ("MANDT", "MATNR", "WERKS", "LGORT", "LABST", "INSME", "SPEME", "LVORM"),
    "EKKO": ("MANDT", "EBELN", "BUKRS", "BSTYP", "BSART", "LOEKZ", "AEDAT", "LIFNR", "EKORG",
             "WAERS", "BEDAT"),
    "EKPO": ("MANDT", "EBELN", "EBELP", "LOEKZ", "AEDAT", "TXZ01", "MATNR", "WERKS", "LGORT",
             "MENGE", "MEINS", "NETPR", "PEINH"),
    # Change document headers. The client column is MANDANT, not MANDT. Only the header
    # is read: CDPOS (the items) is a cluster table (CDCLS) in ECC, not readable by SQL.
    "CDHDR": ("MANDANT", "OBJECTCLAS", "OBJECTID", "CHANGENR", "USERNAME", "UDATE", "UTIME",
              "TCODE", "CHANGE_IND"),
}  # fmt: skip

NO_DATE = "00000000"
OPEN_END = "99991231"


class Tables:
    """The profile's tables in the configured schema (one object per table, so joins
    of the same table name are one FROM entry)."""

    def __init__(self, schema: str | None, extra: dict[str, list[str]] | None = None) -> None:
        # Upper-case names are quoted by SQLAlchemy: they match SAP's upper-case DDIC names.
        # ``extra``: customer fields (Z-fields) appended to a table, read like its own.
        more = extra or {}
        self._t = {
            name: table(name, *(column(c) for c in (*cols, *more.get(name, ()))), schema=schema)
            for name, cols in _COLUMNS.items()
        }

    def __getattr__(self, name: str) -> TableClause:
        try:
            return self.__dict__["_t"][name]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError(name) from None


def sap_date(value: object) -> date | None:
    """CHAR(8) ``YYYYMMDD`` -> date; ``'00000000'``/blank -> None; garbage -> ValueError."""
    if value is None:
        return None
    text = str(value).strip()
    if not text or text == NO_DATE:
        return None
    if text == OPEN_END:
        return date(9999, 12, 31)
    return datetime.strptime(text, "%Y%m%d").date()


def sap_time(value: object) -> tuple[int, int, int]:
    """CHAR(6) ``HHMMSS`` -> (h, m, s); blank -> midnight. ``240000`` is end of day."""
    text = str(value or "").strip() or "000000"
    if len(text) != 6 or not text.isdigit():
        raise ValueError(f"invalid SAP time {value!r}")
    h, m, s = int(text[:2]), int(text[2:4]), int(text[4:])
    if (h, m, s) == (24, 0, 0):
        return 23, 59, 59
    if h > 23 or m > 59 or s > 59:
        raise ValueError(f"invalid SAP time {value!r}")
    return h, m, s


def sap_datetime(day: object, time: object, tz: ZoneInfo) -> datetime | None:
    """SAP date + time in server-local zone ``tz`` -> aware UTC datetime (None: no date)."""
    d = sap_date(day)
    if d is None:
        return None
    h, m, s = sap_time(time)
    return datetime(d.year, d.month, d.day, h, m, s, tzinfo=tz).astimezone(UTC)


def day_start(day: object, tz: ZoneInfo) -> datetime | None:
    """Start of an SAP day (AEDAT) in UTC; what ``source_modified_at`` of a day holds."""
    return sap_datetime(day, "000000", tz)


def flag(value: object) -> bool:
    """SAP boolean: ``'X'`` is true, blank is false (other letters count as true)."""
    return bool(str(value or "").strip())


def text(value: object) -> str | None:
    """SAP CHAR text without padding (None when blank)."""
    if value is None:
        return None
    out = str(value).rstrip()
    return out or None


def strip_zeros(value: object) -> str | None:
    """``'000004001234'`` -> ``'4001234'`` (display form; remote ids keep the zeros)."""
    out = text(value)
    return None if out is None else (out.lstrip("0") or "0")
