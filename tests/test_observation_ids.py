"""Observation identity per producer (DESIGN.md, "Delivery guarantee"), as Hypothesis properties.

For every producer of readings and events (MQTT JSON, plain values, Sparkplug B, tag
scans, inspections; Modbus readings and code-table events; rule events and maintenance
requests; connection_status): distinct observations get distinct ids, and the same input
processed twice (a fresh producer, as after a restart, or a redelivery) gets the same
ids. The generated inputs are drawn from a few times and a few values, so equal
timestamps with different values, equal values at different times and messages without
a timestamp (stamped on arrival, arrival times equal too) all come up in every run.

What "the same observation" means is modelled here independently of the code: for a
message with a time of its own, (point, time, value as the payload gives it); for one
without, every message is its own observation.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Hashable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.records import (
    ArrivalClock,
    EntityType,
    Record,
    SourceRef,
    connection_status,
    format_observed,
)
from agent.rules.config import RuleConfig
from agent.rules.engine import RuleEngine
from agent.sources.base import SourceContext
from agent.sources.modbus import ModbusConfig, ModbusSource
from agent.sources.modbus.poller import Poll
from agent.sources.mqtt import MqttConfig, sparkplug
from agent.sources.mqtt.mapping import Mapper
from tests.helpers.outputs import TestOutput

REF = SourceRef("plant", "mqtt", "s1")
T0 = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)
# Arrival times: few, so that equal ones are common (a burst read in one go).
ARRIVALS = st.sampled_from([T0 + timedelta(microseconds=n) for n in (0, 0, 1, 500, 1000)])
SECONDS = st.sampled_from([1790000000, 1790000001])  # second precision, shared often
VALUES = st.sampled_from([0, 1, 2.5, -7, "run"])


def mqtt(*subscriptions: dict[str, Any]) -> MqttConfig:
    return MqttConfig.model_validate(
        {"type": "mqtt", "host": "127.0.0.1", "client_id": "ids", "subscriptions": subscriptions}
    )


def check_identity(keys: Sequence[Hashable | None], ids: Sequence[str]) -> None:
    """``keys[i]`` names the observation behind ``ids[i]`` (None: one of its own).

    Equal keys must give equal ids (a redelivery or re-read), different keys different
    ids (never a collision)."""
    assert len(keys) == len(ids)
    by_key: dict[Hashable, str] = {}
    for key, rid in zip(keys, ids, strict=True):
        if key is not None:
            assert by_key.setdefault(key, rid) == rid, f"one observation, two ids: {key}"
    distinct = len(by_key) + sum(1 for k in keys if k is None)
    assert len(set(ids)) == distinct, "two observations share an id"


def mapped_ids(
    config: MqttConfig, messages: Sequence[tuple[str, bytes, datetime]]
) -> list[list[str]]:
    """The record ids of each message, mapped by a fresh mapper (as after a restart)."""
    mapper = Mapper(REF, config)
    out = []
    for topic, payload, at in messages:
        outcome = mapper.map(topic, payload, at)
        assert outcome.quarantine is None, outcome.quarantine
        out.append([r.id for r in outcome.records])
    return out


def twice(run: Callable[[], list[list[str]]]) -> list[list[str]]:
    first = run()
    assert run() == first, "the same input processed twice gave other ids"
    return first


# ---------------------------------------------------------------------- MQTT JSON

JSON = mqtt(
    {
        "topic": "j/{asset}",
        "asset": "{asset}",
        "timestamp_path": "ts",
        "points": [{"name": "v", "path": "v"}],
    }
)


@settings(max_examples=150)
@given(
    st.lists(
        st.tuples(st.sampled_from(["A", "B"]), st.none() | SECONDS, VALUES, ARRIVALS), max_size=25
    )
)
@example([("A", 1790000000, 1, T0), ("A", 1790000000, 2, T0), ("A", 1790000000, 1, T0)])
@example([("A", None, 1, T0), ("A", None, 1, T0), ("A", 1790000001, 1, T0)])
def test_mqtt_json_readings(
    messages: list[tuple[str, int | None, Any, datetime]],
) -> None:
    wire = [
        (f"j/{asset}", orjson.dumps({"v": v} if ts is None else {"ts": ts, "v": v}), at)
        for asset, ts, v, at in messages
    ]
    ids = twice(lambda: mapped_ids(JSON, wire))
    keys = [None if ts is None else (asset, ts, orjson.dumps(v)) for asset, ts, v, _ in messages]
    check_identity(keys, [i for (i,) in ids])


# ---------------------------------------------------------------------- plain values

PLAIN = mqtt({"topic": "p/{asset}/level", "format": "value", "asset": "{asset}"})


@settings(max_examples=150)
@given(st.lists(st.tuples(st.sampled_from(["A", "B"]), VALUES, ARRIVALS), max_size=25))
@example([("A", 1, T0)] * 3 + [("A", 2, T0)])
def test_mqtt_plain_values_stamped_on_arrival(messages: list[tuple[str, Any, datetime]]) -> None:
    """No time of its own: every message is an observation, even the same value arriving
    in the same microsecond as the one before."""
    wire = [(f"p/{asset}/level", str(v).encode(), at) for asset, v, at in messages]
    ids = twice(lambda: mapped_ids(PLAIN, wire))
    check_identity([None] * len(messages), [i for (i,) in ids])


# ---------------------------------------------------------------------- Sparkplug B

SPARKPLUG = mqtt({"topic": "spBv1.0/{group}/#", "format": "sparkplug_b"})
MILLIS = st.sampled_from([1795338000000, 1795338000001, 1795338001000])


@settings(max_examples=150)
@given(
    st.lists(
        st.tuples(
            st.none() | MILLIS,  # payload timestamp
            st.lists(
                st.tuples(st.sampled_from(["Speed", "Count"]), st.none() | MILLIS, VALUES),
                min_size=1,
                max_size=3,
                unique_by=lambda m: m[0],
            ),
            ARRIVALS,
        ),
        max_size=12,
    )
)
@example([(None, [("Count", None, 0)], T0), (1795338000000, [("Count", None, 0)], T0)])
@example([(None, [("Count", 1795338000000, 0), ("Speed", 1795338000000, 1)], T0)] * 2)
def test_sparkplug_metrics(
    messages: list[tuple[int | None, list[tuple[str, int | None, Any]], datetime]],
) -> None:
    """A metric's time is its own timestamp, else the payload's, else its arrival."""
    wire = []
    keys: list[Hashable | None] = []
    for seq, (stamp, metrics, at) in enumerate(messages):
        encoded = [
            sparkplug.Metric(
                name=name,
                datatype=12 if isinstance(v, str) else 10,
                value=float(v) if not isinstance(v, str) else v,
                timestamp=ms,
            )
            for name, ms, v in metrics
        ]
        payload = sparkplug.encode(
            sparkplug.Payload(timestamp=stamp, seq=seq % 256, metrics=encoded)
        )
        wire.append(("spBv1.0/g1/DDATA/node1/dev1", payload, at))
        for name, ms, v in metrics:
            when = ms if ms is not None else stamp
            keys.append(None if when is None else (name, when, orjson.dumps(v)))
    ids = twice(lambda: mapped_ids(SPARKPLUG, wire))
    check_identity(keys, [i for per in ids for i in per])


# ---------------------------------------------------------------------- tag scans

TAGS = mqtt(
    {
        "topic": "rfid/{reader}/scan",
        "format": "tag_scan",
        "timestamp_path": "at",
        "tag_scan": {"technology": "rfid"},
    }
)


@settings(max_examples=150)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["R1", "R2"]),
            st.sampled_from(["E200", "E201"]),
            st.none() | SECONDS,
            st.none() | st.sampled_from([-60, -61]),
            ARRIVALS,
        ),
        max_size=25,
    )
)
def test_tag_scans(messages: list[tuple[str, str, int | None, int | None, datetime]]) -> None:
    wire = []
    for reader, tag, ts, rssi, at in messages:
        doc: dict[str, Any] = {"tag": tag, "rssi": rssi}
        if ts is not None:
            doc["at"] = ts
        wire.append((f"rfid/{reader}/scan", orjson.dumps(doc), at))
    ids = twice(lambda: mapped_ids(TAGS, wire))
    keys = [None if ts is None else (r, tag, ts, rssi) for r, tag, ts, rssi, _ in messages]
    check_identity(keys, [i for (i,) in ids])


# ---------------------------------------------------------------------- inspections

INSPECTIONS = mqtt(
    {"topic": "insp/{asset}", "format": "inspection", "asset": "{asset}", "timestamp_path": "at"}
)


@settings(max_examples=150)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["INS-1", "INS-2"]),
            st.none() | SECONDS,
            st.sampled_from(["pass", "fail"]),
            ARRIVALS,
        ),
        max_size=20,
    )
)
def test_inspections(messages: list[tuple[str, int | None, str, datetime]]) -> None:
    """An inspection result is an entity version (remote id from the payload); two results
    that differ, in time or in content, are two versions, never one."""
    wire = []
    for remote_id, ts, result, at in messages:
        doc: dict[str, Any] = {"id": remote_id, "items": [{"id": "door", "result": result}]}
        if ts is not None:
            doc["at"] = ts
        wire.append(("insp/L1", orjson.dumps(doc), at))

    def hashes() -> list[list[str]]:
        mapper = Mapper(REF, INSPECTIONS)
        return [
            [f"{r.entity_id}:{r.content_hash}" for r in mapper.map(t, p, at).records]
            for t, p, at in wire
        ]

    versions = twice(hashes)
    keys = [None if ts is None else (rid, ts, result) for rid, ts, result, _ in messages]
    check_identity(keys, [v for (v,) in versions])
    twice(lambda: mapped_ids(INSPECTIONS, wire))


# ---------------------------------------------------------------------- Modbus

CODES = {"0": {"code": "ok", "severity": "none"}, "17": {"code": "door", "severity": "major"}}
MODBUS = ModbusConfig.model_validate(
    {
        "type": "modbus",
        "connections": {"c": {"host": "127.0.0.1", "port": 502}},
        "devices": {
            "lift": {
                "connection": "c",
                "asset": "L1",
                "points": [
                    {"name": "temp", "address": 0, "type": "int16", "scale": 0.5},
                    {"name": "fault", "address": 1, "kind": "fault", "codes": CODES},
                ],
            }
        },
    }
)
POLL_TIMES = st.sampled_from([T0, T0 + timedelta(microseconds=1), T0 + timedelta(seconds=1)])


def modbus_records(polls: Sequence[tuple[datetime, int, int]]) -> list[Record]:
    """What a fresh Modbus source makes of these polls (time, temp register, fault code)."""
    source = ModbusSource("m", MODBUS, SourceContext("gw", "s1"))
    out = TestOutput()
    source._out = out
    device = source.devices["lift"]
    (request,) = device.requests

    async def run() -> None:
        for at, temp, fault in polls:
            await source._emit(Poll(device, at, [(request, [temp, fault])]))

    asyncio.run(run())
    return out.records


@settings(max_examples=100)
@given(
    st.lists(
        st.tuples(POLL_TIMES, st.sampled_from([40, 41]), st.sampled_from([0, 17])),
        max_size=20,
    )
)
@example([(T0, 40, 0), (T0 + timedelta(seconds=1), 40, 17), (T0, 40, 0), (T0, 40, 17)])
def test_modbus_readings_and_code_events(polls: list[tuple[datetime, int, int]]) -> None:
    """Readings: one per poll, each its own observation (two polls never share a time,
    even when the clock gives one: the source's stamps strictly increase). Events: one
    per change of code, each its own."""
    records = modbus_records(polls)
    again = modbus_records(polls)
    assert [r.id for r in again] == [r.id for r in records]
    readings = [r for r in records if r.entity_type == "meter_reading"]
    assert len(readings) == len(polls)
    check_identity([None] * len(readings), [r.id for r in readings])
    events = [r for r in records if r.entity_type == "event"]
    check_identity([None] * len(events), [r.id for r in events])


# ---------------------------------------------------------------------- rules

RULES = [
    RuleConfig.model_validate(r)
    for r in (
        {
            "name": "hot",
            "type": "threshold",
            "point": "temp",
            "above": 80,
            "clear_below": 70,
            "maintenance_request": {"hold": "0s"},
        },
        {"name": "door", "type": "state", "point": "fault", "values": ["door"]},
    )
]
RULE_REF = SourceRef("lifts", "mqtt", "s1")


def rule_ids(inputs: Sequence[tuple[datetime, str, Any]]) -> list[Record]:
    """Rule records a fresh engine makes of these readings (time, point, value)."""
    engine = RuleEngine(RULE_REF.name, RULES, RULE_REF)
    out = []
    for at, point, value in inputs:
        field = "value" if point == "temp" else "code"
        entity = EntityType.METER_READING if point == "temp" else EntityType.EVENT
        data = {"point": point, "asset_remote_id": "L1", field: value}
        reading = Record.reading(RULE_REF, entity, f"L1/{point}", at, data)
        out += engine.observe([reading], now=at.timestamp()).records[1:]
    return out


@settings(max_examples=150)
@given(
    st.lists(
        st.one_of(
            st.tuples(POLL_TIMES, st.just("temp"), st.sampled_from([60, 75, 90, 95])),
            st.tuples(POLL_TIMES, st.just("fault"), st.sampled_from(["ok", "door"])),
        ),
        max_size=25,
        unique=True,  # distinct input observations (a repeated one is a redelivery)
    )
)
@example([(T0, "temp", 90), (T0, "temp", 60), (T0, "temp", 95), (T0, "temp", 60), (T0, "temp", 90)])
@example([(T0, "fault", "door"), (T0, "fault", "ok"), (T0 + timedelta(seconds=1), "fault", "door")])
def test_rule_events_and_maintenance_requests(inputs: list[tuple[datetime, str, Any]]) -> None:
    """Every raise and clear is its own event, every raise with a request its own request,
    even when they happen in one instant."""
    made = rule_ids(inputs)
    assert [r.id for r in rule_ids(inputs)] == [r.id for r in made]
    events = [r for r in made if r.entity_type == "event"]
    check_identity([None] * len(events), [r.id for r in events])
    requests = [r for r in made if r.entity_type == "maintenance_request"]
    assert len({r.remote_id for r in requests}) == len(requests)


# ---------------------------------------------------------------------- connection_status

SQL = SourceRef("sap", "sap_ecc", "s1")
STATES = st.sampled_from([("connected", None), ("failed", "timeout"), ("failed", "refused")])


@settings(max_examples=100)
@given(st.lists(STATES, max_size=20))
def test_connection_status_changes_stamped_by_the_agent(
    states: list[tuple[str, str | None]],
) -> None:
    """Every change is its own version, however fast they follow one another (same state
    again, same second, same microsecond)."""
    made = [connection_status(SQL, s, r) for s, r in states]
    check_identity([None] * len(made), [f"{r.entity_id}:{r.content_hash}" for r in made])
    check_identity([None] * len(made), [r.id for r in made])


@settings(max_examples=100)
@given(st.lists(st.tuples(STATES, POLL_TIMES), max_size=20))
def test_connection_status_at_given_times(
    changes: list[tuple[tuple[str, str | None], datetime]],
) -> None:
    made = [connection_status(SQL, s, r, at=at) for (s, r), at in changes]
    again = [connection_status(SQL, s, r, at=at) for (s, r), at in changes]
    assert [r.id for r in again] == [r.id for r in made]
    check_identity([(s, r, at) for (s, r), at in changes], [r.id for r in made])


# ---------------------------------------------------------------------- the parts


@settings(max_examples=300)
@given(st.datetimes(timezones=st.none() | st.just(UTC)), st.datetimes(timezones=st.just(UTC)))
def test_observed_time_text_is_exact_fixed_width_and_ordered(a: datetime, b: datetime) -> None:
    ta, tb = format_observed(a), format_observed(b)
    assert len(ta) == len(tb) == len("2026-11-22T09:00:03.120456Z")
    assert datetime.strptime(ta, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC) == a.replace(
        tzinfo=a.tzinfo or UTC
    )
    if (a.replace(tzinfo=a.tzinfo or UTC) < b) != (ta < tb):
        raise AssertionError(f"text order is not time order: {ta} {tb}")


@given(st.lists(st.sampled_from([T0, T0 - timedelta(microseconds=3), T0 + timedelta(0, 0.5)])))
def test_arrival_stamps_strictly_increase(times: list[datetime]) -> None:
    clock = ArrivalClock()
    stamps = [clock.stamp(t) for t in times]
    assert all(a < b for a, b in itertools.pairwise(stamps))
    assert all(s >= t for s, t in zip(stamps, times, strict=True))
    assert clock.era == 0


def test_a_clock_stepped_far_back_starts_an_era() -> None:
    """NTP correcting a clock that ran ahead: the stamps follow it (instead of running
    ahead for as long as the step) in a new era, which stamped ids include: the same
    point, value and microsecond lived twice are still two observations."""
    clock = ArrivalClock()
    ahead = clock.stamp(T0)
    first = Record.reading(REF, EntityType.METER_READING, "p", ahead, {"v": 1}, stamped=clock.era)
    clock.stamp(T0 + timedelta(hours=1))
    again = clock.stamp(T0)
    assert (again, clock.era) == (T0, 1)
    second = Record.reading(REF, EntityType.METER_READING, "p", again, {"v": 1}, stamped=clock.era)
    assert second.observed_at == first.observed_at
    assert second.id != first.id
    source_time = Record.reading(REF, EntityType.METER_READING, "p", T0, {"v": 1})
    assert source_time.id not in {first.id, second.id}
