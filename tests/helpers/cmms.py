"""A small CMMS database on SQLite and the declarative source that reads it."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any


def sqlite_cmms(path: Path, rows: int = 5) -> str:
    """A ``wo`` table (``wonum``, ``descr``, ``changed_at``) with ``rows`` work orders
    ``WO-0``...; the read-only URL the source uses."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE wo (wonum TEXT PRIMARY KEY, descr TEXT, changed_at TEXT)")
    con.executemany(
        "INSERT INTO wo VALUES (?, ?, '2026-01-01 00:00:00')",
        [(f"WO-{i}", f"job {i}") for i in range(rows)],
    )
    con.commit()
    con.close()
    return f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true"


def declarative_source(url: str, **extra: Any) -> dict[str, Any]:
    """A ``[sources.<name>]`` table reading ``wo`` as work orders (title = descr)."""
    return {
        "type": "sql",
        "profile": "declarative",
        "url": url,
        "initial_window": "3650d",
        "entities": {
            "work_orders": {
                "entity_type": "work_order",
                "table": "wo",
                "key": ["wonum"],
                "cursor": "changed_at",
                "fields": {"title": "descr"},
            }
        },
        **extra,
    }
