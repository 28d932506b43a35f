"""The ``maximo`` profile: IBM Maximo WORKORDER, ASSET and LOCATIONS.

The cursor is ``ROWSTAMP`` (a database-wide counter Maximo bumps on every row change:
exact, no overlap needed) or, declared through the ``declarative`` profile,
``CHANGEDATE``. ``ROWSTAMP`` is a number on Oracle and DB2 and a ``rowversion`` (8 bytes)
on SQL Server; both order correctly. Keys are ``(SITEID, <number>)`` and ``remote_id``
is ``SITEID/NUMBER``. Maximo deletes rows for real: reconciliation turns them into
``delete`` records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, FromClause, TableClause, column, select, table

from agent.errors import ConfigError
from agent.records import EntityType, format_time
from agent.sources.sql.config import ChildConfig, SqlSourceConfig
from agent.sources.sql.engine import Database
from agent.sources.sql.model import EntitySpec, Feed, Mapped, Row
from agent.sources.sql.profiles.children import with_children
from agent.sources.sql.profiles.declarative import as_utc

_COLUMNS = {
    "WORKORDER": ("WORKORDERID", "WONUM", "SITEID", "ORGID", "DESCRIPTION", "STATUS",
                  "WORKTYPE", "WOPRIORITY", "ASSETNUM", "LOCATION", "PARENT", "REPORTDATE",
                  "TARGSTARTDATE", "TARGCOMPDATE", "SCHEDSTART", "SCHEDFINISH", "ACTSTART",
                  "ACTFINISH", "STATUSDATE", "CHANGEDATE", "HISTORYFLAG", "ROWSTAMP"),
    "ASSET": ("ASSETID", "ASSETNUM", "SITEID", "ORGID", "DESCRIPTION", "STATUS", "LOCATION",
              "PARENT", "SERIALNUM", "MANUFACTURER", "ASSETTYPE", "INSTALLDATE", "CHANGEDATE",
              "ROWSTAMP"),
    "LOCATIONS": ("LOCATIONSID", "LOCATION", "SITEID", "ORGID", "DESCRIPTION", "STATUS",
                  "TYPE", "CHANGEDATE", "ROWSTAMP"),
}  # fmt: skip


def _t(name: str, schema: str | None) -> TableClause:
    return table(name, *(column(c) for c in _COLUMNS[name]), schema=schema)


def _s(value: object) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def _at(value: object, tz: ZoneInfo) -> str | None:
    at = as_utc(value, tz)
    return None if at is None else format_time(at)


def _child_table(schema: str | None) -> Callable[[ChildConfig, list[str], str], FromClause]:
    def child(ch: ChildConfig, names: list[str], alias: str) -> FromClause:
        # Quoted upper-case, like the profile's own tables (Maximo's DDIC names).
        schema_of, _, name = ch.table.rpartition(".")
        return table(name, *(column(c) for c in names), schema=schema_of or schema).alias(alias)

    return child


def _parent(t: TableClause, entity: str) -> Callable[[str], ColumnElement[Any]]:
    def column_of(name: str) -> ColumnElement[Any]:
        if name not in t.c:
            problem = f"{t.name} has no column {name!r}; it has {list(t.c.keys())}"
            raise ConfigError([(f"children.{entity}", problem)])
        return t.c[name]

    return column_of


def _spec(
    name: str,
    etype: EntityType,
    t: TableClause,
    number: str,
    fields: Callable[[Row], dict[str, Any]],
    *,
    tz: ZoneInfo,
    config: SqlSourceConfig,
) -> EntitySpec:
    keys: tuple[ColumnElement[Any], ...] = (t.c.SITEID, t.c[number])
    base, child_feeds = with_children(
        config.children.get(name, {}), parent_from=t, parent=_parent(t, name), cols=list(t.c),
        where=[t.c.ROWSTAMP.is_not(None)], keys=keys, child_from=_child_table(config.db_schema),
    )  # fmt: skip
    feed = Feed("changes", base, t.c.ROWSTAMP, keys, "number")

    def mapper(row: Row, _ctx: Any) -> Mapped:
        rid = f"{(row['SITEID'] or '').strip()}/{str(row[number]).strip()}"
        return Mapped(rid, fields(row), modified_at=as_utc(row["CHANGEDATE"], tz))

    return EntitySpec(
        name=name,
        entity_type=etype,
        feeds=(feed, *child_feeds),
        key_columns=keys,
        key_select=select(*keys),
        mapper=mapper,
        remote_id=lambda values: "/".join(str(v or "").strip() for v in values),
        precision="second",
        system="maximo",
    )


def specs(config: SqlSourceConfig, _db: Database) -> list[EntitySpec]:
    """WORKORDER (history rows excluded upstream by ``historyflag``), ASSET, LOCATIONS."""
    tz = ZoneInfo(config.timezone)
    schema = config.db_schema

    def work_order(r: Row) -> dict[str, Any]:
        return {
            "title": _s(r["DESCRIPTION"]),
            "status": _s(r["STATUS"]),
            "order_type": _s(r["WORKTYPE"]),
            "priority": r["WOPRIORITY"],
            "asset_remote_id": _join(r["SITEID"], r["ASSETNUM"]),
            "location_remote_id": _join(r["SITEID"], r["LOCATION"]),
            "parent_remote_id": _join(r["SITEID"], r["PARENT"]),
            "reported_at": _at(r["REPORTDATE"], tz),
            "planned_start": _at(r["SCHEDSTART"] or r["TARGSTARTDATE"], tz),
            "planned_end": _at(r["SCHEDFINISH"] or r["TARGCOMPDATE"], tz),
            "actual_start": _at(r["ACTSTART"], tz),
            "actual_end": _at(r["ACTFINISH"], tz),
            "history": bool(r["HISTORYFLAG"]),
        }

    def asset(r: Row) -> dict[str, Any]:
        return {
            "title": _s(r["DESCRIPTION"]),
            "status": _s(r["STATUS"]),
            "asset_type": _s(r["ASSETTYPE"]),
            "serial_number": _s(r["SERIALNUM"]),
            "manufacturer": _s(r["MANUFACTURER"]),
            "location_remote_id": _join(r["SITEID"], r["LOCATION"]),
            "parent_asset_remote_id": _join(r["SITEID"], r["PARENT"]),
            "installed_at": _at(r["INSTALLDATE"], tz),
        }

    def location(r: Row) -> dict[str, Any]:
        return {
            "title": _s(r["DESCRIPTION"]),
            "status": _s(r["STATUS"]),
            "location_type": _s(r["TYPE"]),
        }

    return [
        _spec("work_orders", EntityType.WORK_ORDER, _t("WORKORDER", schema), "WONUM",
              work_order, tz=tz, config=config),
        _spec("assets", EntityType.ASSET, _t("ASSET", schema), "ASSETNUM", asset, tz=tz,
              config=config),
        _spec("locations", EntityType.LOCATION, _t("LOCATIONS", schema), "LOCATION",
              location, tz=tz, config=config),
    ]  # fmt: skip


def _join(site: object, number: object) -> str | None:
    n = _s(number)
    return None if n is None else f"{_s(site) or ''}/{n}"
