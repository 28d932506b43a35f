"""Configuration of the Modbus source (``[sources.<name>]`` with ``type = "modbus"``).

One source holds named connections (a TCP endpoint, a serial port, or an RTU-over-TCP
gateway) and named devices (a unit id on a connection, with its own poll interval and
points). Several devices may share one connection; the source sends one request at a
time per connection.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from agent import profiles
from agent.codes import Code, Severity
from agent.configtypes import Duration, PositiveDuration, Section, at_least
from agent.rbe import ReportByException
from agent.sources.base import SourceConfig

Table = Literal["coil", "discrete_input", "input_register", "holding_register"]
DataType = Literal[
    "bool",
    "bit",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float32",
    "float64",
    "string",
]
Order = Literal["ABCD", "DCBA", "BADC", "CDAB"]

BIT_TABLES = frozenset({"coil", "discrete_input"})
REGISTER_WIDTH: dict[str, int] = {
    "bool": 1,
    "bit": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}
MAX_REGISTERS = 125  # Modbus application protocol spec: read registers, at most 125
MAX_BITS = 2000  # read coils / discrete inputs, at most 2000


class ConnectionConfig(Section):
    """One line to the field: a Modbus TCP endpoint, a serial port, or an RTU-over-TCP
    gateway. Devices on the same connection are polled one request at a time."""

    transport: Literal["tcp", "rtu", "rtu_over_tcp"] = "tcp"
    """``tcp``: Modbus TCP (MBAP framing). ``rtu``: RTU over a serial port (RS-485).
    ``rtu_over_tcp``: RTU frames over a TCP socket (transparent serial gateways)."""
    host: str | None = None
    """Host name or IP address (``tcp`` and ``rtu_over_tcp``)."""
    port: int = Field(502, ge=1, le=65535)
    """TCP port (``tcp`` and ``rtu_over_tcp``)."""
    serial_port: str | None = None
    """Serial device for ``rtu``, e.g. ``/dev/ttyUSB0`` (pyserial URLs such as
    ``socket://host:port`` also work)."""
    baudrate: int = Field(9600, gt=0)
    """Serial speed (``rtu``)."""
    bytesize: Literal[7, 8] = 8
    """Data bits (``rtu``)."""
    parity: Literal["N", "E", "O"] = "N"
    """Parity (``rtu``): none, even, odd."""
    stopbits: Literal[1, 2] = 1
    """Stop bits (``rtu``)."""
    timeout: PositiveDuration = 1.0
    """How long to wait for a connection or for each answer."""
    retries: int = Field(1, ge=0, le=10)
    """Extra attempts of a request that got no answer (not for exception answers)."""
    pause_between_requests: Duration = 0.0
    """Quiet time after each answer before the next request on this connection (slow
    RS-485 gateways and devices need some, e.g. ``"20ms"``)."""
    reconnect_initial: PositiveDuration = 1.0
    """First delay before reconnecting after the connection failed (full jitter)."""
    reconnect_max: PositiveDuration = 60.0
    """Longest delay between reconnect attempts."""

    @model_validator(mode="after")
    def _check_endpoint(self) -> ConnectionConfig:
        if self.transport == "rtu" and not self.serial_port:
            raise ValueError("transport 'rtu' needs 'serial_port'")
        if self.transport != "rtu" and not self.host:
            raise ValueError(f"transport {self.transport!r} needs 'host'")
        return self

    @field_validator("reconnect_max")
    @classmethod
    def _check_backoff(cls, value: float, info: ValidationInfo) -> float:
        return at_least(value, info, "reconnect_initial")


class PointConfig(Section):
    """One value read from a device."""

    name: str = Field(min_length=1)
    """Point name, unique in its device; the reading's id is ``<device>.<name>``."""
    table: Table = "holding_register"
    """Which Modbus table holds it."""
    address: int = Field(ge=0, le=65535)
    """Address, 0- or 1-based as the device's ``address_base`` says."""
    type: DataType = "uint16"
    """Value type. ``bool`` for coils and discrete inputs; ``bit`` is one bit of a
    register (``bit = 0..15``); ``string`` spans ``length`` registers."""
    bit: int | None = Field(None, ge=0, le=15)
    """Bit number (0 = least significant) for ``type = "bit"``."""
    length: int | None = Field(None, ge=1, le=MAX_REGISTERS)
    """Registers of a ``string`` (two characters each)."""
    order: Order = "ABCD"
    """Byte and word order: ``ABCD`` big-endian (Modbus standard), ``CDAB`` word-swapped,
    ``BADC`` byte-swapped, ``DCBA`` little-endian. For ``string``, ``BADC``/``DCBA`` swap
    the two characters of each register."""
    scale: float = 1.0
    """Multiplier applied to numbers: value = raw * scale + offset."""
    offset: float = 0.0
    """Added after scaling."""
    unit: str | None = None
    """Engineering unit sent with readings (e.g. ``kWh``)."""
    kind: Literal["reading", "state", "fault"] = "reading"
    """``reading``: ``meter_reading`` records. ``state`` / ``fault``: ``event`` records
    when the code changes, translated through ``codes``."""
    codes: dict[str, Code] = Field(default_factory=dict)
    """For ``state``/``fault`` points: raw code (as text, e.g. ``"17"``) to normalized
    code, text and severity."""
    unknown_severity: Severity = "warning"
    """Severity of a code missing from ``codes`` (its code reads ``unknown_<raw>``)."""
    rbe: ReportByException | None = None
    """Report-by-exception (deadband, min/max interval). Readings without it are
    reported every poll; events are reported when their code changes."""

    @model_validator(mode="after")
    def _check_type(self) -> PointConfig:
        bits = self.table in BIT_TABLES
        if bits and self.type != "bool":
            raise ValueError(f"table {self.table!r} holds bits: use type 'bool'")
        if not bits and self.type == "bool":
            raise ValueError("type 'bool' is for coils and discrete inputs; use 'bit'")
        if self.type == "bit" and self.bit is None:
            raise ValueError("type 'bit' needs 'bit' (0..15)")
        if self.type == "string" and self.length is None:
            raise ValueError("type 'string' needs 'length' (registers)")
        if self.kind != "reading" and self.type in {"string", "float32", "float64"}:
            raise ValueError(f"a {self.kind} point needs an integer type, not {self.type!r}")
        for raw in self.codes:
            if not raw.lstrip("-").isdigit():
                raise ValueError(f"code key {raw!r} is not an integer")
        return self

    @property
    def width(self) -> int:
        """Registers (or bits) this point occupies."""
        if self.type == "string":
            assert self.length is not None
            return self.length
        return REGISTER_WIDTH[self.type]


class DeviceConfig(Section):
    """One unit id on a connection, polled on its own interval."""

    connection: str
    """Name of the connection (a key of ``connections``)."""
    unit_id: int = Field(1, ge=0, le=255)
    """Modbus unit / slave / device id."""
    interval: PositiveDuration = 10.0
    """Poll period. A poll that overruns skips the missed slots (counted, never
    stacked)."""
    address_base: Literal[0, 1] = 0
    """``1`` when the device documentation counts addresses from 1."""
    asset: str | None = None
    """Remote id of the asset this device measures (``asset_remote_id`` in records)."""
    max_gap_registers: int = Field(16, ge=0, le=MAX_REGISTERS)
    """Unused registers a merged read may span to save a request."""
    max_gap_bits: int = Field(64, ge=0, le=MAX_BITS)
    """Unused coils/inputs a merged read may span."""
    max_registers_per_request: int = Field(MAX_REGISTERS, ge=1, le=MAX_REGISTERS)
    """Lower it for devices that answer fewer than 125 registers per request."""
    max_bits_per_request: int = Field(MAX_BITS, ge=1, le=MAX_BITS)
    """Lower it for devices that answer fewer than 2000 bits per request."""
    demote_after: int = Field(3, ge=1)
    """Consecutive failed polls (no answer, exception, garbled or wrong answer) after
    which the device is ``demoted``: probed every ``demote_for`` instead of every
    ``interval``, one attempt, until it answers again (like Kepware's auto-demotion)."""
    demote_for: Duration = Field(60.0, gt=0)
    """Probe period of a demoted device. A silent unit then costs its connection one
    ``timeout`` per ``demote_for`` (1 s per 60 s with the defaults), so that units that
    do not answer leave the line to those that do."""
    profile: str | None = None
    """Equipment profile supplying the points (``lift_generic``, docs/profiles.md); the
    device's own ``points`` override the profile's by name and add to them."""
    points: list[PointConfig] = Field(default_factory=list)
    """The points read from this device."""

    @model_validator(mode="before")
    @classmethod
    def _expand_profile(cls, data: Any) -> Any:
        # Before validation, so the model is built once with its points (never written
        # into afterwards). A name that does not resolve is the field validator's to report.
        if not isinstance(data, dict) or not isinstance(data.get("profile"), str):
            return data
        base_address = data.get("address_base", 0)
        if base_address not in (0, 1):
            return data
        try:
            base = profile_points(data["profile"], base_address)
        except profiles.ProfileError:
            return data
        return {**data, "points": profiles.merge(base, list(data.get("points") or []))}

    @field_validator("profile")
    @classmethod
    def _check_profile(cls, value: str | None) -> str | None:
        if value is not None:
            profile_points(value, 0)
        return value

    @model_validator(mode="after")
    def _check_points(self) -> DeviceConfig:
        seen: set[str] = set()
        for point in self.points:
            if point.name in seen:
                raise ValueError(f"duplicate point name {point.name!r}")
            seen.add(point.name)
            if point.address < self.address_base:
                raise ValueError(f"point {point.name!r}: address below address_base")
            if point.address - self.address_base + point.width > 65536:
                raise ValueError(f"point {point.name!r}: runs past address 65535")
        return self


def profile_point(profile: profiles.Profile, point: profiles.ProfilePoint) -> PointConfig:
    """The Modbus point config of a profile point, at the profile's address base."""
    return _profile_point(profile, point, profile.modbus_address_base)


def _profile_point(
    profile: profiles.Profile, point: profiles.ProfilePoint, address_base: int
) -> PointConfig:
    table = point.carried_by("modbus")
    assert table is not None
    data = {**profiles.common(profile, point), "kind": point.kind, **table}
    if isinstance(data.get("address"), int):
        data["address"] += address_base - profile.modbus_address_base
    return PointConfig.model_validate(data)


def profile_points(name: str, address_base: int) -> list[PointConfig]:
    """The points of profile ``name`` a Modbus device counting from ``address_base``
    reads. Raises :class:`~agent.profiles.ProfileError`."""
    return profiles.convert(
        profiles.load(name), "modbus", lambda pr, pt: _profile_point(pr, pt, address_base)
    )


class ModbusConfig(SourceConfig):
    """A Modbus source: connections, and devices polled over them."""

    type: Literal["modbus"]
    """Always ``modbus``."""
    connections: dict[str, ConnectionConfig]
    """Named connections (``[sources.<name>.connections.<conn>]``)."""
    devices: dict[str, DeviceConfig]
    """Named devices (``[sources.<name>.devices.<device>]``)."""

    def known_points(self) -> set[str]:
        """The point names of every device (profiles included)."""
        return {p.name for device in self.devices.values() for p in device.points}

    @model_validator(mode="after")
    def _check_refs(self) -> ModbusConfig:
        for name, device in self.devices.items():
            if device.connection not in self.connections:
                raise ValueError(
                    f"device {name!r}: unknown connection {device.connection!r} "
                    f"(have: {', '.join(sorted(self.connections)) or 'none'})"
                )
        return self
