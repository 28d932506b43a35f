"""The declarative profile: any CMMS schema, one table or SELECT per entity in config.

Example (a Mechanic's Mate / MP2 style work order table)::

    [sources.cmms.entities.work_orders]
    entity_type = "work_order"
    table = "WORKORDERS"
    key = ["WONUM"]
    cursor = "LASTMODIFIED"
    fields = { title = "DESCRIPTION", status = "STATUS", asset_remote_id = "EQUIPID" }
    deleted_when = { DELETED = "1" }
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import FromClause, column, func, or_, select, text

from agent.records import Op
from agent.sources.sql.config import ChildConfig, EntityConfig, SqlSourceConfig
from agent.sources.sql.engine import Database
from agent.sources.sql.mapping import resolve
from agent.sources.sql.model import EntitySpec, Feed, Mapped, Row
from agent.sources.sql.profiles.children import with_children

_UTC_ZONE = ZoneInfo("UTC")


def remote_id_of(values: Any, names: Sequence[str] = ()) -> str:
    """Key values -> ``remote_id`` (strings keep their zero padding; ``/`` between parts).

    A NULL or blank key part raises (the row is quarantined with the reason): such rows
    have no identity, and as ``"None"`` or ``""`` they would all collapse into one entity
    upstream, each overwriting the last.
    """
    parts: list[str] = []
    for i, v in enumerate(values):
        text = v.rstrip() if isinstance(v, str) else "" if v is None else str(v)
        if not text:
            what = f"key column {names[i]!r}" if i < len(names) else f"key part {i + 1}"
            raise ValueError(
                f"{what} is {'NULL' if v is None else 'blank'}: the row has no identity"
            )
        parts.append(text)
    return "/".join(parts)


def as_utc(value: Any, tz: ZoneInfo) -> datetime | None:
    """A database time as UTC; naive values are local times of ``tz``.

    SQLite has no time type: ISO text (``2026-11-20 08:00:00``) is parsed.
    """
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            # Fast path for the common UTC database: no zone arithmetic.
            return (
                value.replace(tzinfo=UTC)
                if tz is _UTC_ZONE
                else value.replace(tzinfo=tz).astimezone(UTC)
            )
        return value.astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=tz).astimezone(UTC)
    return None


def _clean(value: Any) -> Any:
    return value.rstrip() if value.__class__ is str else value


def _subquery(sql: str, names: list[str], alias: str) -> FromClause:
    # is_literal: names are written as the database spells them (no quoting, no folding).
    return text(sql).columns(*(column(c, is_literal=True) for c in names)).subquery(alias)


def _child(child: ChildConfig, names: list[str], alias: str) -> FromClause:
    return _subquery(f"SELECT * FROM {child.table}", names, alias)


def _entity(name: str, ent: EntityConfig, tz: ZoneInfo) -> EntitySpec:
    sql = ent.query if ent.query is not None else f"SELECT * FROM {ent.table}"
    joins = [p for child in ent.children.values() for p in child.on.values()]
    q = _subquery(sql, list(dict.fromkeys([*ent.key, ent.cursor, *joins])), "q")
    mod, keys = q.c[ent.cursor], tuple(q.c[k] for k in ent.key)
    base, child_feeds = with_children(
        ent.children, parent_from=q, parent=lambda c: q.c[c], cols=[text("q.*")],
        # A row with a NULL key has no identity and cannot be keyset-paged past: left
        # out, counted by the sync (EntitySpec.unkeyed) and reported.
        where=[mod.is_not(None), *(k.is_not(None) for k in keys)], keys=keys,
        child_from=_child,
    )  # fmt: skip
    feed = Feed("main", base, mod, keys, ent.cursor_kind, ent.overlap)
    deleted = {k: str(v) for k, v in ent.deleted_when.items()}

    timestamp = ent.cursor_kind == "timestamp"
    plan: list[list[tuple[str, str | None]]] = []  # resolved once: databases fold case
    # The last modified value and its UTC form: rows of a chunk often share one (batch
    # updates, day-precision dates), and converting costs more than comparing.
    last: list[Any] = [None, None]

    def modified(raw: Any) -> datetime | None:
        prev = last[0]
        # Equal datetimes with equal fold are the same local time (naive) or instant.
        same = raw.__class__ is datetime and prev.__class__ is datetime and raw == prev
        if same and raw.fold == prev.fold:
            return last[1]  # type: ignore[no-any-return]
        last[:] = raw, as_utc(raw, tz)
        return last[1]  # type: ignore[no-any-return]

    def prepare(row: Row) -> list[list[tuple[str, str | None]]]:
        return [
            [(f, resolve(row, c)) for f, c in ent.fields.items()],
            [(k, resolve(row, k)) for k in ent.key],
            [(v, resolve(row, c)) for c, v in deleted.items()],
        ]

    def mapper(row: Row, _ctx: Any) -> Mapped:
        if not plan:
            plan.extend(prepare(row))
        fields, key, gone_when = plan
        # Hot loop (every row): an unresolved column (None) reads as None, since no row
        # has a None key; text is right-stripped inline rather than by a call per field.
        get: Callable[[str | None], Any] = row.get  # type: ignore[assignment]
        data = {f: v.rstrip() if (v := get(n)).__class__ is str else v for f, n in fields}
        gone = bool(gone_when) and any(n and str(_clean(get(n))) == v for v, n in gone_when)
        if len(key) == 1:
            k = get(key[0][1])
            remote_id = k.rstrip() if k.__class__ is str else "" if k is None else str(k)
            if not remote_id:
                remote_id_of([k], [key[0][0]])  # raises, naming the column
        else:
            remote_id = remote_id_of([get(n) if n else None for _, n in key], [k for k, _ in key])
        return Mapped(
            remote_id,
            data,
            Op.DELETE if gone else Op.UPSERT,
            modified(get("_m")) if timestamp else None,
        )

    return EntitySpec(
        name=name,
        entity_type=ent.entity_type,
        feeds=(feed, *child_feeds),
        key_columns=keys,
        key_select=select(*keys).select_from(q),
        mapper=mapper,
        remote_id=remote_id_of,
        unkeyed=select(func.count()).select_from(q).where(or_(*(k.is_(None) for k in keys))),
        precision=ent.modified_precision,
        system="sql",
        # Checked against the first row of every chunk (sync) and by check-config
        # --connect: an unresolved column would map to null for every row.
        extra={"columns": _columns(name, ent)},
    )


def _columns(name: str, ent: EntityConfig) -> dict[str, str]:
    """Key path (below the source) -> the column it names."""
    at = f"entities.{name}"
    out = {f"{at}.fields.{field}": col for field, col in ent.fields.items()}
    out.update({f"{at}.deleted_when.{col}": col for col in ent.deleted_when})
    out.update({f"{at}.key": col for col in ent.key})
    return out


def specs(config: SqlSourceConfig, _db: Database) -> list[EntitySpec]:
    """One spec per ``[entities.<name>]`` table."""
    tz = ZoneInfo(config.timezone)
    return [_entity(name, ent, tz) for name, ent in config.entities.items()]
