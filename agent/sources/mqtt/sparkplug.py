"""Sparkplug B payloads: a small protobuf decoder (and encoder, for tests and tools).

Only what a subscribing host needs is decoded: the payload's ``timestamp``, ``seq`` and
``metrics``; per metric its ``name``, ``alias``, ``timestamp``, ``datatype``, ``is_null``
and scalar value. DataSets, Templates, properties and metadata are skipped (their bytes
are well-formed protobuf, so skipping is safe). Writing the ~150 lines here avoids a
generated module and a protobuf runtime dependency.

Topic namespace: ``spBv1.0/<group>/<NBIRTH|NDATA|NDEATH|DBIRTH|DDATA|DDEATH|...>/<edge
node>[/<device>]``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

# Sparkplug B DataType enum (the subset with scalar values).
INT8, INT16, INT32, INT64 = 1, 2, 3, 4
UINT8, UINT16, UINT32, UINT64 = 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME, TEXT, UUID = 9, 10, 11, 12, 13, 14, 15
BYTES = 17
_SIGNED_BITS = {INT8: 8, INT16: 16, INT32: 32, INT64: 64}
MESSAGE_TYPES = frozenset(
    {"NBIRTH", "NDATA", "NDEATH", "DBIRTH", "DDATA", "DDEATH", "NCMD", "DCMD", "STATE"}
)


class SparkplugError(ValueError):
    """The payload is not a valid Sparkplug B protobuf message."""


@dataclass(slots=True)
class Metric:
    """One metric of a payload (value already typed by its datatype)."""

    name: str | None = None
    alias: int | None = None
    timestamp: int | None = None
    datatype: int | None = None
    is_null: bool = False
    value: Any = None


@dataclass(slots=True)
class Payload:
    """A decoded Sparkplug B payload."""

    timestamp: int | None = None
    seq: int | None = None
    metrics: list[Metric] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed Sparkplug topic."""

    group: str
    message_type: str
    edge_node: str
    device: str | None


def parse_topic(topic: str) -> Topic | None:
    """Parse ``spBv1.0/group/TYPE/node[/device]``; None when it is not one."""
    parts = topic.split("/")
    if len(parts) not in (4, 5) or parts[0] != "spBv1.0" or parts[2] not in MESSAGE_TYPES:
        return None
    return Topic(parts[1], parts[2], parts[3], parts[4] if len(parts) == 5 else None)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise SparkplugError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, raw value) of every field of one message."""
    out: list[tuple[int, int, Any]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise SparkplugError("truncated fixed64")
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise SparkplugError("truncated length-delimited field")
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            if pos + 4 > len(buf):
                raise SparkplugError("truncated fixed32")
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise SparkplugError(f"unsupported wire type {wire}")
        if number == 0:
            raise SparkplugError("field number 0")
        out.append((number, wire, value))
    return out


def _signed(value: int, datatype: int | None) -> int:
    bits = _SIGNED_BITS.get(datatype or 0)
    if bits is None:
        return value
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SparkplugError("string is not valid UTF-8") from exc


# Wire type of each Metric field read here (varint 0, fixed64 1, bytes 2, fixed32 5).
_METRIC_WIRE = {1: 2, 2: 0, 3: 0, 4: 0, 7: 0, 10: 0, 11: 0, 12: 5, 13: 1, 14: 0, 15: 2, 16: 2}


def _metric(buf: bytes) -> Metric:
    m = Metric()
    for number, wire, raw in _fields(buf):
        want = _METRIC_WIRE.get(number)
        if want is None:
            continue  # a field this decoder does not use (properties, metadata, ...)
        if wire != want:
            raise SparkplugError(f"metric field {number} has wire type {wire}, not {want}")
        if number == 1:
            m.name = _text(raw)
        elif number == 2:
            m.alias = raw
        elif number == 3:
            m.timestamp = raw
        elif number == 4:
            m.datatype = raw
        elif number == 7:
            m.is_null = bool(raw)
        elif number in (10, 11):
            m.value = raw
        elif number == 12:
            m.value = struct.unpack("<f", raw)[0]
        elif number == 13:
            m.value = struct.unpack("<d", raw)[0]
        elif number == 14:
            m.value = bool(raw)
        elif number == 15:
            m.value = _text(raw)
        elif number == 16:
            m.value = bytes(raw)
    if isinstance(m.value, int) and not isinstance(m.value, bool):
        m.value = _signed(m.value, m.datatype)
        if m.datatype == BOOLEAN:
            m.value = bool(m.value)
    if m.is_null:
        m.value = None
    return m


def decode(buf: bytes) -> Payload:
    """Decode a Sparkplug B payload; raises :class:`SparkplugError` on malformed input."""
    p = Payload()
    for number, wire, raw in _fields(buf):
        if number == 1 and wire == 0:
            p.timestamp = raw
        elif number == 2 and wire == 2:
            p.metrics.append(_metric(raw))
        elif number == 3 and wire == 0:
            p.seq = raw
    return p


# ---------------------------------------------------------------------- encoder


def _key(number: int, wire: int) -> bytes:
    return _enc_varint(number << 3 | wire)


def _enc_varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _ld(number: int, data: bytes) -> bytes:
    return _key(number, 2) + _enc_varint(len(data)) + data


def _enc_value(m: Metric) -> bytes:
    v, dt = m.value, m.datatype
    if dt in (FLOAT,):
        return _key(12, 5) + struct.pack("<f", v)
    if dt in (DOUBLE,) or (dt is None and isinstance(v, float)):
        return _key(13, 1) + struct.pack("<d", v)
    if dt == BOOLEAN or isinstance(v, bool):
        return _key(14, 0) + _enc_varint(int(v))
    if dt in (STRING, TEXT, UUID) or isinstance(v, str):
        return _ld(15, v.encode())
    if dt == BYTES or isinstance(v, bytes):
        return _ld(16, v)
    field_no = 11 if dt in (INT64, UINT64, DATETIME) else 10
    bits = 64 if field_no == 11 else 32
    return _key(field_no, 0) + _enc_varint(int(v) & ((1 << bits) - 1))


def encode_metric(m: Metric) -> bytes:
    """Encode one metric (scalar values only)."""
    out = b""
    if m.name is not None:
        out += _ld(1, m.name.encode())
    if m.alias is not None:
        out += _key(2, 0) + _enc_varint(m.alias)
    if m.timestamp is not None:
        out += _key(3, 0) + _enc_varint(m.timestamp)
    if m.datatype is not None:
        out += _key(4, 0) + _enc_varint(m.datatype)
    if m.is_null or m.value is None:
        return out + _key(7, 0) + b"\x01"
    if isinstance(m.value, float) and not math.isfinite(m.value):
        raise ValueError("non-finite values are not encodable here")
    return out + _enc_value(m)


def encode(payload: Payload) -> bytes:
    """Encode a payload (for tests, simulators and tools)."""
    out = b""
    if payload.timestamp is not None:
        out += _key(1, 0) + _enc_varint(payload.timestamp)
    for m in payload.metrics:
        out += _ld(2, encode_metric(m))
    if payload.seq is not None:
        out += _key(3, 0) + _enc_varint(payload.seq)
    return out
