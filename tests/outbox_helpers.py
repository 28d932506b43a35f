"""Record factories shared by the outbox tests and benchmarks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from agent.records import EntityType, Record, SourceRef

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
