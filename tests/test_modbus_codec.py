"""Decoding of every data type and byte/word order against known register images."""

from __future__ import annotations

import pytest

from agent.sources.modbus.codec import DecodeError, decode_registers, encode, scaled
from agent.sources.modbus.config import PointConfig

# (type, order, registers as the device sends them, value) - images worked out by hand
# from the IEEE 754 / two's complement big-endian bytes, then permuted per order.
KNOWN = [
    ("uint16", "ABCD", [0xFFFE], 65534),
    ("int16", "ABCD", [0xFFFE], -2),
    ("int16", "BADC", [0xFEFF], -2),
    ("uint16", "DCBA", [0x3412], 0x1234),
    ("int32", "ABCD", [0xF8A4, 0x32EB], -123456789),
    ("int32", "CDAB", [0x32EB, 0xF8A4], -123456789),
    ("int32", "BADC", [0xA4F8, 0xEB32], -123456789),
    ("int32", "DCBA", [0xEB32, 0xA4F8], -123456789),
    ("uint32", "ABCD", [0x1234, 0x5678], 0x12345678),
    ("uint32", "CDAB", [0x5678, 0x1234], 0x12345678),
    ("uint32", "BADC", [0x3412, 0x7856], 0x12345678),
    ("uint32", "DCBA", [0x7856, 0x3412], 0x12345678),
    ("float32", "ABCD", [0x42F6, 0xE979], 123.456),
    ("float32", "CDAB", [0xE979, 0x42F6], 123.456),
    ("float32", "BADC", [0xF642, 0x79E9], 123.456),
    ("float32", "DCBA", [0x79E9, 0xF642], 123.456),
    ("uint64", "ABCD", [0x0102, 0x0304, 0x0506, 0x0708], 0x0102030405060708),
    ("uint64", "CDAB", [0x0708, 0x0506, 0x0304, 0x0102], 0x0102030405060708),
    ("uint64", "BADC", [0x0201, 0x0403, 0x0605, 0x0807], 0x0102030405060708),
    ("uint64", "DCBA", [0x0807, 0x0605, 0x0403, 0x0201], 0x0102030405060708),
    ("int64", "ABCD", [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE], -2),
    ("int64", "CDAB", [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF], -2),
    ("float64", "ABCD", [0x3FF8, 0x0000, 0x0000, 0x0000], 1.5),
    ("float64", "DCBA", [0x0000, 0x0000, 0x0000, 0xF83F], 1.5),
    ("float64", "CDAB", [0x0000, 0x0000, 0x0000, 0x3FF8], 1.5),
    ("float64", "BADC", [0xF83F, 0x0000, 0x0000, 0x0000], 1.5),
]


def point(type_: str, order: str = "ABCD", **extra: object) -> PointConfig:
    return PointConfig(name="p", address=0, type=type_, order=order, **extra)  # type: ignore[arg-type]


@pytest.mark.parametrize(("type_", "order", "registers", "value"), KNOWN)
def test_decode_known_images(type_: str, order: str, registers: list[int], value: float) -> None:
    decoded = decode_registers(point(type_, order), registers)
    assert decoded == pytest.approx(value, rel=1e-7) if "float" in type_ else decoded == value


@pytest.mark.parametrize(("type_", "order", "registers", "value"), KNOWN)
def test_encode_is_the_inverse(type_: str, order: str, registers: list[int], value: float) -> None:
    if type_ == "float32":
        value = decode_registers(point(type_, order), registers)  # the exact float32
    assert encode(value, type_, order) == registers


def test_bit_in_register() -> None:
    assert decode_registers(point("bit", bit=3), [0b1000]) is True
    assert decode_registers(point("bit", bit=2), [0b1000]) is False
    assert decode_registers(point("bit", bit=15), [0x8000]) is True


def test_strings_both_byte_orders_and_padding() -> None:
    assert decode_registers(point("string", length=3), [0x4845, 0x4C4C, 0x4F00]) == "HELLO"
    assert decode_registers(point("string", "BADC", length=3), [0x4548, 0x4C4C, 0x004F]) == "HELLO"
    assert decode_registers(point("string", length=2), [0x4142, 0x2020]) == "AB"


def test_nan_and_infinity_are_decode_errors() -> None:
    with pytest.raises(DecodeError):
        decode_registers(point("float32"), [0x7FC0, 0x0000])
    with pytest.raises(DecodeError):
        decode_registers(point("float32"), [0x7F80, 0x0000])


def test_scale_and_offset() -> None:
    p = point("int16", scale=0.1, offset=-40.0)
    assert scaled(p, 650) == pytest.approx(25.0)
    assert scaled(point("uint16"), 7) == 7
    assert isinstance(scaled(point("uint16"), 7), int)
    assert scaled(point("bit", bit=0, scale=2.0), True) is True
