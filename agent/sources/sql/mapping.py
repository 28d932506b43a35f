"""Per-source field mappings from config: rename, drop, and custom fields.

Applied after the profile's own mapping, to every record of the entity. The config is
re-read on reload (the supervisor restarts a source whose config changed), so a mapping
change needs no code change.
"""

from __future__ import annotations

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
