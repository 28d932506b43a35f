"""Turn raw registers and bits into values, per data type and byte/word order.

Order letters name the bytes of the value as the device sends them, ``A`` being the most
significant: ``ABCD`` is big-endian (the Modbus standard), ``CDAB`` swaps the 16-bit
words, ``BADC`` swaps the bytes inside each word, ``DCBA`` is little-endian. For 64-bit
values the same two switches (word swap, byte swap) apply to all four words.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from agent.sources.modbus.config import PointConfig

_STRUCT = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "int64": ">q",
    "uint64": ">Q",
    "float32": ">f",
    "float64": ">d",
}


class DecodeError(ValueError):
    """The raw data cannot be read as the point's type (e.g. a NaN float)."""


def _ordered_bytes(registers: Sequence[int], order: str) -> bytes:
    """Bytes of ``registers`` in big-endian (ABCD) order, undoing the device's order."""
    words = list(registers)
    if order in {"CDAB", "DCBA"}:
        words.reverse()
    raw = b"".join(w.to_bytes(2, "big") for w in words)
    if order in {"BADC", "DCBA"}:
        raw = b"".join(raw[i + 1 : i + 2] + raw[i : i + 1] for i in range(0, len(raw), 2))
    return raw


def encode(value: int | float | str, type_: str, order: str = "ABCD") -> list[int]:
    """The registers a device holding ``value`` sends (the inverse of :func:`decode_registers`;
    used by tests and benchmarks to build simulated devices)."""
    if type_ == "string":
        assert isinstance(value, str)
        data = value.encode("utf-8")
        data += b"\0" * (len(data) % 2)
    else:
        data = struct.pack(_STRUCT[type_], value)
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if order in {"BADC", "DCBA"}:
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    if order in {"CDAB", "DCBA"} and type_ != "string":
        words.reverse()
    return words


def decode_registers(point: PointConfig, registers: Sequence[int]) -> int | float | str | bool:
    """The raw (unscaled) value of a register point."""
    if point.type == "bit":
        assert point.bit is not None
        return bool((registers[0] >> point.bit) & 1)
    if point.type == "string":
        words = list(registers)
        if point.order in {"BADC", "DCBA"}:
            words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
        raw = b"".join(w.to_bytes(2, "big") for w in words)
        return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()
    fmt = _STRUCT[point.type]
    if len(registers) * 2 != struct.calcsize(fmt):  # a device that answered short
        raise DecodeError(
            f"{point.type} needs {struct.calcsize(fmt) // 2} registers, got {len(registers)}"
        )
    (value,) = struct.unpack(fmt, _ordered_bytes(registers, point.order))
    if isinstance(value, float) and not math.isfinite(value):
        raise DecodeError(f"not a finite number ({value})")
    return value  # type: ignore[no-any-return]


def scaled(point: PointConfig, raw: int | float | str | bool) -> int | float | str | bool:
    """Apply ``scale`` and ``offset`` to numbers; keep integers integers when unscaled."""
    if isinstance(raw, bool | str) or (point.scale == 1.0 and point.offset == 0.0):
        return raw
    return raw * point.scale + point.offset
