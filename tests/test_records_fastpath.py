"""The fast paths in agent/records.py give exactly what the plain library calls give."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from agent.records import (
    NS,
    EntityType,
    Record,
    SourceRef,
    _uuid5,
    entity_uuid,
    format_time,
    iso_utc,
)
from agent.sources.sql.sync import rfc3339


@given(st.text())
def test_uuid5_matches_the_standard_library(name: str):
    assert _uuid5(name) == str(uuid.uuid5(NS, name))


@given(st.datetimes(), st.integers(min_value=-14 * 60, max_value=14 * 60))
def test_format_time_matches_strftime(value: datetime, offset: int):
    aware = value.replace(tzinfo=timezone(timedelta(minutes=offset)))
    try:
        utc = aware.astimezone(UTC)
    except OverflowError:
        return
    expected = utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
    assert format_time(aware) == expected


@given(st.text(min_size=1))
def test_entity_ids_are_unchanged(remote_id: str):
    ref = SourceRef("sap-prd", "sap_ecc")
    rec = Record.entity(ref, EntityType.WORK_ORDER, remote_id, {"title": "x"})
    eid = entity_uuid("sap-prd", EntityType.WORK_ORDER, remote_id)
    assert rec.entity_id == str(eid)
    assert rec.id == str(uuid.uuid5(NS, f"{eid}:{rec.content_hash}"))


@given(st.datetimes(timezones=st.just(UTC)))
def test_iso_utc_matches_isoformat_milliseconds(value: datetime):
    assert iso_utc(value) == value.isoformat(timespec="milliseconds")[:-6] + "Z"


@given(st.datetimes(), st.integers(min_value=-14 * 60, max_value=14 * 60))
def test_sql_rfc3339_matches_format_time(value: datetime, offset: int):
    aware = value.replace(tzinfo=timezone(timedelta(minutes=offset)))
    try:
        aware.astimezone(UTC)
    except OverflowError:
        return
    if aware.astimezone(UTC).year >= 1000:
        assert rfc3339(aware) == format_time(aware)
    if value.year >= 1000:  # below, format_time keeps strftime's unpadded year
        assert rfc3339(value) == format_time(value)
