"""Record factories shared by the outbox tests and benchmarks."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.outbox import Outbox
from agent.records import EntityType, Record, SourceRef, canonical_json, chain_id

SRC = SourceRef("test", "test", "site-1")
T0 = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)


def work_order(key: str, version: int = 0, pad: int = 0) -> Record:
    """A work order version; ``pad`` adds bytes to reach a chosen size."""
    data = {"title": f"Work order {key}", "status": "released", "version": version}
    if pad:
        data["notes"] = "x" * pad
    return Record.entity(SRC, EntityType.WORK_ORDER, key, data)


def reading(point: str, n: int, pad: int = 0) -> Record:
    """The n-th reading of ``point`` (one second apart)."""
    data: dict[str, object] = {"value": n * 0.5, "unit": "kWh"}
    if pad:
        data["notes"] = "x" * pad
    return Record.reading(SRC, EntityType.METER_READING, point, T0 + timedelta(seconds=n), data)


def stored_json(record: Record, rid: str) -> bytes:
    """The envelope of ``record`` as the outbox stores it under its assigned id ``rid``."""
    return canonical_json({**record.envelope(), "id": rid})


def pin_epoch(path: Path, epoch: str) -> None:
    """Create the outbox file ``path`` with a fixed epoch, so its chained ids are known.

    Golden tests only: a real outbox's epoch is random, made when its file is created.
    """
    Outbox(path)._check_and_migrate()  # the schema, as open() makes it
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", (epoch,))
    finally:
        con.close()


def chained_ids(epoch: str, records: list[Record]) -> list[str | None]:
    """The ids a FRESH outbox of ``epoch`` stores ``records`` under, appended in order.

    DESIGN.md's rule, independent of the outbox's code: an entity version chains from
    its entity's previous one (the epoch for the first), a version equal to the previous
    one is not stored (None), and readings keep their own ids.
    """
    last: dict[str, tuple[str, str]] = {}  # entity_id -> (content_hash, id)
    out: list[str | None] = []
    for rec in records:
        if rec.retention.value == "reading":
            out.append(rec.id)
            continue
        prev = last.get(rec.entity_id)
        if prev is not None and prev[0] == rec.content_hash:
            out.append(None)
            continue
        rid = chain_id(rec.entity_id, rec.content_hash, epoch if prev is None else prev[1])
        last[rec.entity_id] = (rec.content_hash, rid)
        out.append(rid)
    return out
