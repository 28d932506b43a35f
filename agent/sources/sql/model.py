"""What a profile declares, and the SQL the sync builds from it.

A profile turns its config into :class:`EntitySpec` objects. Each entity has one or more
:class:`Feed`\\ s: a SELECT of the entity's columns plus a *modified* expression and
*key* columns that order the rows. The sync reads a feed in chunks with a compound
watermark ``(modified, key)``::

    WHERE mod >= :m AND (mod > :m OR key > :k) ORDER BY mod, key LIMIT :chunk

which neither skips nor re-reads forever rows that share a boundary timestamp, and keeps an
index on ``(mod, key)`` usable (a plain ``OR`` would not). SAP entities have a second feed
driven by the status change documents (JCDS), so a status-only change is seen although
the header's change date did not move.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, Select, and_, or_

from agent.records import EntityType, Op, Precision
from agent.sources.sql.config import CursorKind

Row = dict[str, Any]
MOD = "_m"
"""Label of the modified expression in feed rows."""


def key_label(i: int) -> str:
    """Label of the i-th ordering key in feed rows."""
    return f"_k{i}"


class Mapped(NamedTuple):
    """What a profile makes of one row (before field mappings).

    A named tuple rather than a frozen dataclass: one is built per row, and a tuple
    costs a third of the dataclass's per-field ``object.__setattr__``.
    """

    remote_id: str
    data: dict[str, Any]
    op: Op = Op.UPSERT
    modified_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Feed:
    """One ordered stream of changed rows of an entity."""

    name: str
    select: Select[Any]
    mod: ColumnElement[Any]
    keys: tuple[ColumnElement[Any], ...]
    kind: CursorKind
    overlap: float = 0.0
    snapshot: bool = False
    """No usable change column: every pass reads the whole feed (unchanged rows are
    skipped by content hash)."""
    day: ColumnElement[Any] | None = None
    """For a ``sap_datetime`` ``mod`` that concatenates a date and a time column (SAP
    ``UDATE || UTIME``): the date column alone. Chunk queries also filter on it, so an
    index on the date (CDHDR, JCDS) narrows the scan; the concatenation alone cannot
    use one."""
    trigger: bool = False
    """The feed only re-reads rows another feed of the entity also reads in full (change
    documents, status changes): a full pass reads it from its watermark, not from the
    start of its history."""


Enricher = Callable[[Sequence[Row]], Awaitable[Any]]
"""Per-chunk look-ups (e.g. SAP statuses for the chunk's objects): rows -> context."""
Mapper = Callable[[Row, Any], Mapped]
"""Row (+ enrichment context) -> :class:`Mapped`; raising quarantines the row."""


@dataclass(frozen=True, slots=True)
class EntitySpec:
    """An entity a profile produces: its feeds, key query and mapping."""

    name: str
    entity_type: EntityType
    feeds: tuple[Feed, ...]
    key_columns: tuple[ColumnElement[Any], ...]
    """Identity columns (in the base table) for reconciliation's key scan."""
    key_select: Select[Any]
    """``SELECT <identity columns> FROM ... WHERE <profile filters>`` (no order/limit).
    Reconciliation reads whole rows instead (:func:`scan_query`); kept for tools."""
    mapper: Mapper
    remote_id: Callable[[Sequence[Any]], str]
    """Identity column values -> ``remote_id`` (the same the mapper gives)."""
    enrich: Enricher | None = None
    unkeyed: Select[Any] | None = None
    """``SELECT count(*)`` of the rows the feeds leave out because a key column is NULL
    (declarative entities over views: such a row has no identity, and keyset paging
    cannot pass it). Counted and reported by the sync, never read as records."""
    precision: Precision = "second"
    system: str = "sql"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dedupe(self) -> bool:
        """Are rows of this entity read more than once by design?

        Overlap re-reads, snapshot feeds, several feeds per entity (SAP: AEDAT and JCDS).
        Passed to the outbox as ``dedupe``, which ignores it since schema 3: it skips
        every entity version equal to the entity's last one, because with chained ids a
        re-read row would otherwise go upstream as a new version (docs/outbox.md).
        """
        return len(self.feeds) > 1 or any(f.overlap > 0 or f.snapshot for f in self.feeds)


def keys_after(cols: Sequence[ColumnElement[Any]], values: Sequence[Any]) -> ColumnElement[bool]:
    """``(c0, c1, ...) > (v0, v1, ...)`` spelled out, for dialects without row values."""
    c, v = cols[0], values[0]
    greater: ColumnElement[bool] = c > v
    if len(cols) == 1:
        return greater
    return or_(greater, and_(c == v, keys_after(cols[1:], values[1:])))


def chunk_query(feed: Feed, after: Watermark | None, limit: int) -> Select[Any]:
    """The next chunk of ``feed`` after ``after`` (inclusive of ``after.mod`` when no key)."""
    sel = feed.select.add_columns(
        feed.mod.label(MOD), *(k.label(key_label(i)) for i, k in enumerate(feed.keys))
    )
    if after is not None and after.mod is not None:
        m = after.mod
        if after.key is None:
            sel = sel.where(feed.mod >= m)
        else:
            sel = sel.where(feed.mod >= m, or_(feed.mod > m, keys_after(feed.keys, after.key)))
        if feed.day is not None and isinstance(m, str) and len(m) >= 8:
            sel = sel.where(feed.day >= m[:8])
    return sel.order_by(feed.mod, *feed.keys).limit(limit)


def scan_query(spec: EntitySpec, after: Sequence[Any] | None, limit: int) -> Select[Any]:
    """The next chunk of whole rows in key order, for reconciliation (keyset pagination).

    The entity's first feed is its base SELECT (every column its mapper reads, the
    profile's filters); ordered by the identity columns instead of the change column,
    so every row is read once per pass whatever its change date. Labelled like a feed's
    rows (``_m``, ``_k0``...), so mapping and ``remote_data`` come out the same.
    """
    base = spec.feeds[0]
    sel = base.select.add_columns(
        base.mod.label(MOD), *(k.label(key_label(i)) for i, k in enumerate(spec.key_columns))
    )
    if after is not None:
        sel = sel.where(keys_after(spec.key_columns, after))
    return sel.order_by(*spec.key_columns).limit(limit)


# ---------------------------------------------------------------------- watermarks


@dataclass(frozen=True, slots=True)
class Watermark:
    """A position in a feed: rows with ``(mod, key) > (self.mod, self.key)`` come next.

    ``key = None`` means "from ``mod`` inclusive" (the start of a pass).
    """

    mod: Any
    key: tuple[Any, ...] | None

    def encode(self) -> dict[str, Any]:
        """JSON-ready form for the outbox cursor."""
        return {
            "m": encode_value(self.mod),
            "k": None if self.key is None else [encode_value(v) for v in self.key],
        }

    @classmethod
    def decode(cls, value: Any) -> Watermark | None:
        """Inverse of :meth:`encode` (None for anything unexpected)."""
        if not isinstance(value, dict) or "m" not in value:
            return None
        key = value.get("k")
        return cls(
            decode_value(value["m"]),
            None if key is None else tuple(decode_value(v) for v in key),
        )


def encode_value(value: Any) -> Any:
    """A cursor value as JSON, keeping its Python type."""
    if isinstance(value, datetime):
        return {"dt": value.isoformat()}
    if isinstance(value, date):
        return {"d": value.isoformat()}
    if isinstance(value, Decimal):
        return {"dec": str(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b": base64.b64encode(bytes(value)).decode()}
    return value


def decode_value(value: Any) -> Any:
    """Inverse of :func:`encode_value`."""
    if isinstance(value, dict):
        if "dt" in value:
            return datetime.fromisoformat(value["dt"])
        if "d" in value:
            return date.fromisoformat(value["d"])
        if "dec" in value:
            return Decimal(value["dec"])
        if "b" in value:
            return base64.b64decode(value["b"])
    return value


def shift_back(kind: CursorKind, mod: Any, seconds: float) -> Any:
    """``mod`` moved back by ``seconds`` (the overlap), in the cursor's own type."""
    if seconds <= 0 or mod is None:
        return mod
    if kind == "sap_date" and isinstance(mod, str) and len(mod) == 8:
        days = max(1, -(-int(seconds) // 86400))
        return (datetime.strptime(mod, "%Y%m%d") - timedelta(days=days)).strftime("%Y%m%d")
    if kind == "sap_datetime" and isinstance(mod, str) and len(mod) == 14:
        moved = datetime.strptime(mod, "%Y%m%d%H%M%S") - timedelta(seconds=seconds)
        return moved.strftime("%Y%m%d%H%M%S")
    if isinstance(mod, datetime | date):
        return mod - timedelta(seconds=seconds)
    return mod  # numbers (rowversion) and text: no meaningful overlap


def window_start(kind: CursorKind, seconds: float | None, tz: ZoneInfo, aware: bool) -> Any:
    """The lower bound of an initial sync over the last ``seconds`` (None: everything)."""
    if seconds is None or kind in {"number", "text"}:
        return None
    local = datetime.now(UTC).astimezone(tz) - timedelta(seconds=seconds)
    if kind == "sap_date":
        return local.strftime("%Y%m%d")
    if kind == "sap_datetime":
        return local.strftime("%Y%m%d%H%M%S")
    return local if aware else local.replace(tzinfo=None)
