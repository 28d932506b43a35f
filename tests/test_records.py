"""The record envelope: deterministic ids, canonical hashing, envelope shape."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import orjson
import pytest

from agent.records import (
    NS,
    EntityType,
    Op,
    Record,
    RetentionClass,
    SourceRef,
    canonical_json,
    connection_status,
    format_time,
)

SAP = SourceRef("sap-prd", "sap_ecc", "plant-1000")


def test_entity_ids_follow_the_design_formula() -> None:
    rec = Record.entity(SAP, EntityType.WORK_ORDER, "000004001234", {"title": "Replace door motor"})
    eid = uuid.uuid5(NS, "sap-prd:work_order:000004001234")
    assert rec.entity_id == str(eid)
    assert rec.id == str(uuid.uuid5(NS, f"{eid}:{rec.content_hash}"))
    assert rec.content_hash.startswith("sha256:")
    assert len(rec.content_hash) == len("sha256:") + 64


def test_same_content_same_id_whatever_the_key_order_or_time() -> None:
    a = Record.entity(
        SAP,
        EntityType.ASSET,
        "10",
        {"a": 1, "b": {"x": 1, "y": 2}},
        observed_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    b = Record.entity(
        SAP,
        EntityType.ASSET,
        "10",
        {"b": {"y": 2, "x": 1}, "a": 1},
        observed_at=datetime(2026, 6, 1, tzinfo=UTC),
    )
    assert a.id == b.id
    assert a.observed_at != b.observed_at


def test_changed_content_or_op_changes_id_but_not_entity_id() -> None:
    a = Record.entity(SAP, EntityType.ASSET, "10", {"status": "active"})
    b = Record.entity(SAP, EntityType.ASSET, "10", {"status": "inactive"})
    c = Record.entity(SAP, EntityType.ASSET, "10", {"status": "active"}, op=Op.DELETE)
    assert len({a.id, b.id, c.id}) == 3
    assert a.entity_id == b.entity_id == c.entity_id


def test_zero_padded_keys_are_distinct_entities() -> None:
    a = Record.entity(SAP, EntityType.ASSET, "000000000010", {})
    b = Record.entity(SAP, EntityType.ASSET, "10", {})
    assert a.entity_id != b.entity_id
    assert a.remote_id == "000000000010"


def test_reading_id_is_source_point_time_and_content() -> None:
    src = SourceRef("lift-mqtt", "mqtt", "tower-a")
    at = datetime(2026, 11, 22, 9, 0, 3, 120000, tzinfo=UTC)
    r1 = Record.reading(src, EntityType.METER_READING, "lift1/trips", at, {"value": 5})
    r2 = Record.reading(
        src,
        EntityType.METER_READING,
        "lift1/trips",
        at.astimezone(timezone(timedelta(hours=2))),
        {"value": 5},
    )
    name = f"lift-mqtt:lift1/trips:2026-11-22T09:00:03.120000Z:{r1.content_hash}"
    assert r1.id == r2.id == str(uuid.uuid5(NS, name))
    assert r1.observed_at == r1.source_modified_at == "2026-11-22T09:00:03.120000Z"
    # Another value at the same time is another observation (the design's old rule,
    # source:point:time, gave both one id and the upstream dropped the second).
    r3 = Record.reading(src, EntityType.METER_READING, "lift1/trips", at, {"value": 6})
    assert r3.id != r1.id
    assert r1.retention is RetentionClass.READING
    with pytest.raises(ValueError, match="reading"):
        Record.reading(src, EntityType.WORK_ORDER, "p", at, {})


def test_envelope_has_every_design_field() -> None:
    rec = Record.entity(
        SAP,
        EntityType.WORK_ORDER,
        "000004001234",
        {"title": "Replace door motor"},
        custom={"zz_contract": "C-77"},
        remote_data={"AUFNR": "000004001234"},
        source_modified_at=datetime(2026, 11, 21, 8, 15, tzinfo=UTC),
        modified_precision="day",
    )
    env = orjson.loads(rec.to_json())
    assert set(env) == {
        "id",
        "entity_id",
        "entity_type",
        "op",
        "source",
        "remote_id",
        "source_modified_at",
        "modified_precision",
        "observed_at",
        "content_hash",
        "data",
        "custom",
        "remote_data",
    }
    assert env["source"] == {"name": "sap-prd", "system": "sap_ecc", "site": "plant-1000"}
    assert env["source_modified_at"] == "2026-11-21T08:15:00.000Z"
    assert env["entity_type"] == "work_order"
    assert rec.envelope(seq=7)["seq"] == 7


def test_canonical_json_is_stable_and_exact() -> None:
    assert (
        canonical_json({"b": 1, "a": [Decimal("1.10"), "é"]}) == '{"a":["1.10","é"],"b":1}'.encode()
    )
    naive = datetime(2026, 1, 2, 3, 4, 5)
    assert canonical_json({"t": naive}) == canonical_json({"t": naive.replace(tzinfo=UTC)})
    with pytest.raises(TypeError):
        canonical_json({"x": object()})
    assert format_time(datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=1)))) == (
        "2026-01-01T11:00:00.000Z"
    )


def test_connection_status_back_to_an_old_state_is_a_new_version() -> None:
    t0 = datetime(2026, 11, 22, 9, tzinfo=UTC)
    a = connection_status(SAP, "connected", at=t0)
    b = connection_status(SAP, "reauthorization_required", "unauthorized", at=t0 + timedelta(1))
    c = connection_status(SAP, "connected", at=t0 + timedelta(2))
    assert a.entity_type is EntityType.CONNECTION_STATUS
    assert len({a.id, b.id, c.id}) == 3
    assert connection_status(SAP, "connected", at=t0).id == a.id
    assert a.entity_id == b.entity_id == c.entity_id


def test_connection_status_changes_in_one_instant_never_share_content() -> None:
    """Stamped by the agent (no ``at``), two changes never share ``changed_at``, however
    close together: connected, failed, connected within one second (or one microsecond)
    is three versions, the third not a copy of the first."""
    got = [connection_status(SAP, s) for s in ("connected", "failed", "connected") * 50]
    assert len({r.content_hash for r in got}) == len(got)
    assert len({r.id for r in got}) == len(got)
    changed = [r.data["changed_at"] for r in got]
    assert changed == sorted(changed)  # microseconds, fixed width: text order is time order
    assert all(len(t) == len("2026-11-22T09:00:00.000000Z") for t in changed)
