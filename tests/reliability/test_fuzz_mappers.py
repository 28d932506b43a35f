"""Hypothesis fuzzing of the payload mappers: MQTT ``Mapper``, Sparkplug B decoder, Modbus codec.

Properties: the MQTT mapper never raises, and every message ends up as records, a
quarantine entry with a reason, or a counted problem; every record it makes serializes
(a record that could not be sent would be a poison pill in the outbox). The Sparkplug
decoder raises only ``SparkplugError``. The Modbus codec raises only ``DecodeError`` (which
the source quarantines) for any register image, including a device answering short, and
round-trips every finite value it encodes.
"""

from __future__ import annotations

import json
import math
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.records import SourceRef
from agent.sources.modbus.codec import DecodeError, decode_registers, encode
from agent.sources.modbus.config import REGISTER_WIDTH, PointConfig
from agent.sources.mqtt import MqttConfig, sparkplug
from agent.sources.mqtt.mapping import Mapper

pytestmark = pytest.mark.reliability

CASES = Path(__file__).resolve().parents[1] / "cases" / "mqtt"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Every golden case config: JSON paths, plain values, Sparkplug B, tag scans, inspections,
# events with code tables, the lift profile.
CONFIGS = {
    p.parent.name: MqttConfig.model_validate(tomllib.loads(p.read_text()))
    for p in sorted(CASES.glob("*/config.toml"))
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["v", "ts", "at", "value", "id", "items", "tag", "state", "q", "x"])
            | st.text(max_size=8),
            inner,
            max_size=6,
        )
    ),
    max_leaves=20,
)
# stdlib json: it writes integers beyond 64 bits too, which a device may well send.
payloads = st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode())


def topics_for(config: MqttConfig) -> st.SearchStrategy[str]:
    """Topics matching the subscriptions (named levels and wildcards filled in) or not."""

    def fill(pattern: str, parts: list[str]) -> str:
        out = []
        for i, level in enumerate(pattern.split("/")):
            if level == "#":
                out.extend(parts[i % len(parts) :][:2] or ["x"])
            elif level == "+" or level.startswith("{"):
                out.append(parts[i % len(parts)] or "x")
            else:
                out.append(level)
        return "/".join(out)

    patterns = [s.topic for s in config.subscriptions]
    # Topics arrive as valid UTF-8 (brokers refuse anything else): no lone surrogates.
    chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="/+#\0")
    level = st.text(chars, min_size=0, max_size=6)
    matching = st.builds(fill, st.sampled_from(patterns), st.lists(level, min_size=1, max_size=5))
    return matching | st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


def check_outcome(mapper: Mapper, topic: str, payload: bytes) -> None:
    before = sum(mapper.counters.values())
    outcome = mapper.map(topic, payload, NOW)
    for record in outcome.records:
        orjson.dumps(record.envelope())  # every record can be sent
    if outcome.quarantine is not None:
        assert outcome.quarantine.reason
        orjson.dumps(outcome.quarantine.context)
    accounted = (
        outcome.records
        or outcome.quarantine is not None
        or sum(mapper.counters.values()) > before
        or outcome.skipped
        or mapper.rbe.suppressed
    )
    # A message that produced nothing must be explained somewhere (a count or RBE).
    assert accounted or mapper.route(topic) is not None


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_mqtt_mapper_never_raises(case: str) -> None:
    config = CONFIGS[case]
    mapper = Mapper(SourceRef("fuzz", "mqtt", config.site or "s"), config)

    @FUZZ
    @given(topic=topics_for(config), payload=payloads)
    def run(topic: str, payload: bytes) -> None:
        check_outcome(mapper, topic, payload)

    run()


sparkplug_metrics = st.builds(
    sparkplug.Metric,
    name=st.none() | st.text(max_size=10),
    alias=st.none() | st.integers(0, 2**32),
    timestamp=st.none() | st.integers(0, 2**63 - 1),
    datatype=st.sampled_from([3, 4, 7, 8, 9, 10, 11, 12]),
    value=st.none()
    | st.integers(-(2**31), 2**31 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
    | st.text(max_size=10),
)


def _valid_sparkplug(draw: Any) -> bytes:
    metrics = draw(st.lists(sparkplug_metrics, max_size=4))
    try:
        return sparkplug.encode(sparkplug.Payload(timestamp=1, seq=0, metrics=metrics))
    except Exception:  # the encoder is a test tool; mismatched datatype/value pairs
        return b""


@st.composite
def mutated_sparkplug(draw: Any) -> bytes:
    """A valid encoding, then truncated or with bytes flipped."""
    raw = bytearray(_valid_sparkplug(draw))
    if raw and draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    for _ in range(draw(st.integers(0, 3))):
        if raw:
            raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
    return bytes(raw)


@FUZZ
@given(st.binary(max_size=400) | mutated_sparkplug())
@example(b"\x08" + b"\xff" * 11)  # an overlong varint
@example(b"\x12\x7f")  # a length beyond the end
# Found by this test (session 3): metric fields with the wrong wire type raised TypeError.
@example(b"\x08\x00\x12\r\n\x00\x10\x00\x18\x00\x80\x80\x01\x80\x00`\x00\x08\x00")
@example(b"\x08\x00\x12\x02\x08\x00\x08\x00\x08\x00\x80\x01\x00\x08\x00\x08\x00")
@example(b"\x12\x02\x08\x05")  # a metric name (a string) sent as a varint
def test_sparkplug_decoder_raises_only_its_error(raw: bytes) -> None:
    try:
        payload = sparkplug.decode(raw)
    except sparkplug.SparkplugError:
        return
    assert isinstance(payload, sparkplug.Payload)


register_types = sorted(t for t in REGISTER_WIDTH if t not in {"bool", "bit"})
ORDERS = ["ABCD", "DCBA", "BADC", "CDAB"]


@FUZZ
@given(
    type_=st.sampled_from([*register_types, "string", "bit"]),
    order=st.sampled_from(ORDERS),
    registers=st.lists(st.integers(0, 0xFFFF), max_size=6),
)
def test_modbus_codec_raises_only_decode_error(
    type_: str, order: str, registers: list[int]
) -> None:
    extra: dict[str, Any] = {"bit": 3} if type_ == "bit" else {}
    extra |= {"length": 3} if type_ == "string" else {}
    point = PointConfig(name="p", address=0, type=type_, order=order, **extra)
    try:
        value = decode_registers(point, registers)
    except DecodeError:
        return
    except IndexError:
        assert type_ == "bit"
        assert not registers
        return
    if isinstance(value, float):
        assert math.isfinite(value)


@FUZZ
@given(
    type_=st.sampled_from(register_types),
    order=st.sampled_from(ORDERS),
    data=st.data(),
)
def test_modbus_codec_round_trips(type_: str, order: str, data: st.DataObject) -> None:
    bits = {"int16": 16, "uint16": 16, "int32": 32, "uint32": 32, "int64": 64, "uint64": 64}
    if type_.startswith("float"):
        width = 32 if type_ == "float32" else 64
        value: float | int = data.draw(
            st.floats(allow_nan=False, allow_infinity=False, width=width)
        )
    elif type_.startswith("u"):
        value = data.draw(st.integers(0, 2 ** bits[type_] - 1))
    else:
        value = data.draw(st.integers(-(2 ** (bits[type_] - 1)), 2 ** (bits[type_] - 1) - 1))
    point = PointConfig(name="p", address=0, type=type_, order=order)
    assert decode_registers(point, encode(value, type_, order)) == value


def test_short_answer_is_a_decode_error_not_a_crash() -> None:
    """A device answering fewer registers than asked: found by this fuzz suite (the codec
    raised ``struct.error``, which the source did not catch, so the source restarted)."""
    point = PointConfig(name="p", address=0, type="float64")
    with pytest.raises(DecodeError, match="needs 4 registers, got 1"):
        decode_registers(point, [0x3FF8])
