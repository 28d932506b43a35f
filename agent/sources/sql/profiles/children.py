"""Child tables of ``maximo`` and ``declarative`` entities (:class:`ChildConfig`).

A child table changes without the entity's cursor moving (a long description, a status
history, task lines). Declared with a ``cursor``, it becomes one more feed of the entity:
``entity JOIN child`` ordered by ``(child cursor, child key, entity key)``, with its own
compound watermark, so a changed child row re-reads the entity rows it belongs to in the
next incremental pass. Without a cursor it adds no feed: content reconciliation is what
sees its changes. Children with ``columns`` are also LEFT JOINed into every feed, so
their values reach the record (``<child>.<column>`` in the row).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, FromClause, Select, and_, select

from agent.sources.sql.config import ChildConfig
from agent.sources.sql.model import Feed

ChildFrom = Callable[[ChildConfig, list[str], str], FromClause]
"""(child, columns it needs, alias) -> the child table as a FROM clause."""


def needed(child: ChildConfig) -> list[str]:
    """Every child column the joins, the feed and the row use, once each."""
    names = [*child.on, *(child.key or child.on), *child.columns, *child.match]
    if child.cursor is not None:
        names.append(child.cursor)
    return list(dict.fromkeys(names))


def _join(child: ChildConfig, c: FromClause, parent: Callable[[str], Any]) -> Any:
    return and_(
        *(c.c[col] == parent(col_of_parent) for col, col_of_parent in child.on.items()),
        *(c.c[col] == value for col, value in child.match.items()),
    )


def with_children(
    children: Mapping[str, ChildConfig],
    *,
    parent_from: FromClause,
    parent: Callable[[str], Any],
    cols: Sequence[Any],
    where: Sequence[ColumnElement[bool]],
    keys: tuple[ColumnElement[Any], ...],
    child_from: ChildFrom,
) -> tuple[Select[Any], list[Feed]]:
    """The entity's base SELECT (children with ``columns`` LEFT JOINed) and one feed per
    child with a cursor. ``parent`` resolves an entity column name for the join."""
    for child in children.values():  # a bad column name fails at start, used or not
        for col in child.on.values():
            parent(col)
    joined: FromClause = parent_from
    extra: list[Any] = []
    for i, (name, child) in enumerate(children.items()):
        if child.columns:
            c = child_from(child, needed(child), f"c{i}_")
            joined = joined.outerjoin(c, _join(child, c, parent))
            extra += [c.c[col].label(f"{name}.{col}") for col in child.columns]
    every = [*cols, *extra]
    base = select(*every).select_from(joined).where(*where)
    feeds: list[Feed] = []
    for i, (name, child) in enumerate(children.items()):
        if child.cursor is None:
            continue
        t = child_from(child, needed(child), f"t{i}_")
        cursor = t.c[child.cursor]
        sel = (
            select(*every)
            .select_from(joined.join(t, _join(child, t, parent)))
            .where(*where, cursor.is_not(None))
        )
        # The entity key breaks ties between entity rows that one child row joins
        # (a child keyed by something other than the entity's key).
        order = (*(t.c[k] for k in child.key or child.on), *keys)
        kind, overlap = child.cursor_kind, child.overlap
        feeds.append(Feed(f"child:{name}", sel, cursor, order, kind, overlap, trigger=True))
    return base, feeds
