"""Per-source field mappings from config: rename, drop, and custom fields.

Applied after the profile's own mapping, to every record of the entity. The config is
re-read on reload (the supervisor restarts a source whose config changed), so a mapping
change needs no code change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from agent.sources.sql.config import FieldMapping

_EMPTY = FieldMapping()


def _lookup(row: dict[str, Any], column: str) -> Any:
    if column in row:
        return row[column]
    # Databases fold unquoted names differently (PostgreSQL lower, Oracle upper).
    folded = column.lower()
    for name, value in row.items():
        if name.lower() == folded:
            return value
    return None


def _clean(value: Any) -> Any:
    return value.rstrip() if isinstance(value, str) else value


def resolve(row: dict[str, Any], column: str) -> str | None:
    """The name under which ``row`` holds ``column`` (exact, else case-insensitive)."""
    if column in row:
        return column
    folded = column.lower()
    return next((name for name in row if name.lower() == folded), None)


def remote_columns(mapping: FieldMapping | None, row: dict[str, Any]) -> list[str] | None:
    """Columns left out of ``remote_data`` (internal and dropped ones), or None when no
    raw row is sent. The same for every row of a query: compute once per chunk."""
    m = mapping or _EMPTY
    if not m.remote_data:
        return None
    return [k for k in row if k.startswith("_") or k in m.drop]


def apply(
    mapping: FieldMapping | None,
    data: dict[str, Any],
    row: dict[str, Any],
    leave_out: list[str] | None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """``(data, custom, remote_data)`` after renaming, dropping and adding fields."""
    if mapping is None or mapping is _EMPTY:
        out = data
        custom: dict[str, Any] = {}
    else:
        out = {mapping.rename.get(k, k): v for k, v in data.items()}
        for name in mapping.drop:
            out.pop(name, None)
        custom = {name: _clean(_lookup(row, col)) for name, col in mapping.custom.items()}
    if leave_out is None:
        return out, custom, None
    remote = row.copy()  # a C-level copy and a few deletes beat a comprehension
    for key in leave_out:
        del remote[key]
    return out, custom, remote


class MissingColumnsError(ValueError):
    """A mapped column is not in the result set: the entity fails, nothing is written.

    Mapping it to ``null`` instead would overwrite the cloud's value with nothing, silently,
    for every row. The entity is retried (with backoff) and stays ``failed`` with this
    message until the mapping or the query is fixed.
    """


def mapped_columns(
    entity: str, configured: Mapping[str, str], mapping: FieldMapping | None
) -> dict[str, str]:
    """What the config says comes from a column, as ``{key path below the source:
    column}``: the profile's configured columns (``entities.wo.fields.title``...) and the
    custom fields of the entity's mapping (``mappings.wo.custom.zz_contract``)."""
    wanted = dict(configured)
    if mapping is not None:
        at = f"mappings.{entity}.custom"
        wanted.update({f"{at}.{name}": col for name, col in mapping.custom.items()})
    return wanted


def missing_columns(wanted: Mapping[str, str], columns: Iterable[str]) -> list[tuple[str, str]]:
    """The ``(key path, message)`` of every ``wanted`` column the result set lacks
    (compared as :func:`resolve` finds them: exact, else case-insensitive)."""
    have = list(columns)
    folded = {c.lower() for c in have}
    shown = ", ".join(c for c in have if not c.startswith("_")) or "none"
    return [
        (key, f"column {col!r} is not in the query's result (it returns: {shown})")
        for key, col in wanted.items()
        if col.lower() not in folded
    ]


def check_columns(
    source: str, entity: str, wanted: Mapping[str, str], columns: Iterable[str]
) -> None:
    """Raise :class:`MissingColumnsError` naming source, entity, and every mapped field
    (by key path) whose column the result set lacks."""
    missing = missing_columns(wanted, columns)
    if missing:
        raise MissingColumnsError(
            f"source {source!r}, entity {entity!r}: "
            + "; ".join(f"{key}: {msg}" for key, msg in missing)
            + "; nothing of this entity is written until the mapping or the query is fixed"
        )
