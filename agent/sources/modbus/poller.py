"""Polling: one worker per connection, one request at a time, per-device schedules.

Each connection has a worker task that owns the pymodbus client. It polls whichever
device is due next; a device's slots are anchored to its start time (no drift), and a
poll that runs past the next slot skips it (counted as an overrun, never stacked).

A unit that does not answer costs its connection ``timeout * (retries + 1)``. To keep a
dead or mute unit from stalling healthy units on the same line, a poll stops at the
unit's first unanswered request, and after ``failures_before_offline`` failed polls the
unit is ``offline``: it is probed every ``offline_interval`` with one attempt, no retries.
pymodbus's own auto-reconnect and "close after N silent requests" are disabled: a silent
unit is not a dead line, so the worker reconnects only when every unit went silent.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusIOException

from agent import tasks
from agent.backoff import Backoff
from agent.sources.modbus.config import ConnectionConfig, DeviceConfig
from agent.sources.modbus.planner import Request, plan, split

log = structlog.get_logger("agent.sources.modbus")

ILLEGAL_DATA_ADDRESS = 2
SILENT_REQUESTS_BEFORE_RECONNECT = 3
JITTER_SAMPLES = 1024

Client = AsyncModbusTcpClient | AsyncModbusSerialClient


class UnitSilent(Exception):
    """The unit did not answer (all attempts timed out)."""


class UnitException(Exception):
    """The unit answered with a Modbus exception code."""

    def __init__(self, code: int, request: Request) -> None:
        super().__init__(f"exception code {code} on {request.table} {request.start}")
        self.code = code


class LineDown(Exception):
    """The connection itself is gone."""


@dataclass(slots=True)
class Poll:
    """What one poll of a device read: per request, its raw answer."""

    device: DeviceState
    observed_at: datetime
    answers: list[tuple[Request, list[int] | list[bool]]]
    invalid: list[tuple[Request, str]] = field(default_factory=list)
    ok: bool = True


@dataclass
class DeviceState:
    """A device's plan, schedule and figures (shown in status)."""

    name: str
    config: DeviceConfig
    requests: list[Request] = field(default_factory=list)
    state: str = "unknown"
    next_due: float = 0.0
    polls: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    overruns: int = 0
    splits: int = 0
    requests_sent: int = 0
    invalid_points: dict[str, str] = field(default_factory=dict)
    last_success: float | None = None
    last_error: str | None = None
    last_cycle_seconds: float | None = None
    jitter: deque[float] = field(default_factory=lambda: deque(maxlen=JITTER_SAMPLES))
    """Start delay of recent polls after their slot (queueing behind other units too)."""
    done_lag: deque[float] = field(default_factory=lambda: deque(maxlen=JITTER_SAMPLES))
    """Time from slot to poll completion of recent polls."""

    def __post_init__(self) -> None:
        if not self.requests:
            self.requests = plan(self.config)

    @property
    def interval(self) -> float:
        """The current poll period (longer while offline)."""
        return self.config.offline_interval if self.state == "offline" else self.config.interval

    def status(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return {
            "state": self.state,
            "unit_id": self.config.unit_id,
            "polls": self.polls,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "overruns": self.overruns,
            "requests_per_poll": len(self.requests),
            "requests_sent": self.requests_sent,
            "splits": self.splits,
            "invalid_points": dict(self.invalid_points),
            "last_success": self.last_success,
            "last_error": self.last_error,
            "last_cycle_ms": None
            if self.last_cycle_seconds is None
            else round(self.last_cycle_seconds * 1000, 1),
            "jitter_p99_ms": round(percentile(self.jitter, 99) * 1000, 1) if self.jitter else None,
        }


def percentile(values: Any, pct: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(0, math.ceil(pct / 100 * len(ordered)) - 1)
    return float(ordered[rank])


def make_client(conf: ConnectionConfig) -> Client:
    """The pymodbus client for a connection (retries and reconnects are ours)."""
    common: dict[str, Any] = {"timeout": conf.timeout, "retries": 0, "reconnect_delay": 0}
    if conf.transport == "rtu":
        assert conf.serial_port is not None
        return AsyncModbusSerialClient(
            conf.serial_port,
            framer=FramerType.RTU,
            baudrate=conf.baudrate,
            bytesize=conf.bytesize,
            parity=conf.parity,
            stopbits=conf.stopbits,
            **common,
        )
    assert conf.host is not None
    framer = FramerType.SOCKET if conf.transport == "tcp" else FramerType.RTU
    return AsyncModbusTcpClient(conf.host, port=conf.port, framer=framer, **common)


_READ = {
    "coil": "read_coils",
    "discrete_input": "read_discrete_inputs",
    "holding_register": "read_holding_registers",
    "input_register": "read_input_registers",
}

Sink = Callable[[Poll], Awaitable[None]]
StateChange = Callable[[DeviceState, str, str | None], Awaitable[None]]


class ConnectionWorker:
    """Owns one connection's client and polls its devices one request at a time."""

    def __init__(
        self,
        name: str,
        config: ConnectionConfig,
        devices: list[DeviceState],
        *,
        sink: Sink,
        on_state: StateChange,
        client_factory: Callable[[ConnectionConfig], Client] = make_client,
    ) -> None:
        self.name = name
        self.config = config
        self.devices = devices
        self._sink = sink
        self._on_state = on_state
        self._factory = client_factory
        self._client: Client | None = None
        self._silent = 0
        self.state = "connecting"
        self.connects = 0
        self.reconnects = 0
        self.last_error: str | None = None

    def status(self) -> dict[str, Any]:
        """JSON-ready figures of the connection."""
        return {
            "state": self.state,
            "transport": self.config.transport,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
        }

    async def run(self) -> None:
        """Connect, poll due devices, reconnect with jittered backoff; until cancelled."""
        backoff = Backoff(self.config.reconnect_initial, self.config.reconnect_max)
        # Spread the units' first slots over their interval, so that units sharing a line
        # do not all fall due at once and queue behind each other every cycle.
        start = time.monotonic()
        for i, device in enumerate(self.devices):
            device.next_due = start + device.interval * i / len(self.devices)
        try:
            while True:
                tasks.raise_if_cancelling()  # a lost stop (see agent.tasks)
                if not await self._ensure_connected():
                    await tasks.sleep(backoff.delay())
                    continue
                backoff.reset()
                device = min(self.devices, key=lambda d: d.next_due)
                wait = device.next_due - time.monotonic()
                if wait > 0:
                    await tasks.sleep(wait)
                await self._poll(device)
        finally:
            self._close()

    def _close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _ensure_connected(self) -> bool:
        if self._client is not None and self._client.connected:
            return True
        self._close()
        self.state = "connecting"
        client = self._factory(self.config)
        client.set_max_no_responses(1 << 30)
        try:
            async with asyncio.timeout(self.config.timeout + 1):
                ok = await client.connect()
        except (TimeoutError, OSError, ConnectionException) as exc:
            ok, self.last_error = False, f"{type(exc).__name__}: {exc}"
        if not ok:
            client.close()
            self.last_error = self.last_error or "connect failed"
            await self._line_down(self.last_error)
            return False
        self._client, self.state, self._silent = client, "connected", 0
        self.reconnects += self.connects > 0
        self.connects += 1
        now = time.monotonic()
        for device in self.devices:
            device.next_due = max(device.next_due, now)  # overdue devices poll at once
        log.info("modbus_connected", connection=self.name, transport=self.config.transport)
        return True

    async def _line_down(self, error: str) -> None:
        if self.state != "disconnected":
            log.warning("modbus_connection_failed", connection=self.name, error=error)
        self.state = "disconnected"
        for device in self.devices:
            device.last_error = error
            await self._set_state(device, "disconnected", error)

    async def _set_state(self, device: DeviceState, state: str, reason: str | None) -> None:
        if device.state != state:
            old, device.state = device.state, state
            log.info("modbus_device_state", device=device.name, old=old, new=state, reason=reason)
            await self._on_state(device, state, reason)

    async def _poll(self, device: DeviceState) -> None:
        due = device.next_due
        began = time.monotonic()
        device.jitter.append(max(0.0, began - due))
        poll = Poll(device, datetime.now(UTC), [])
        error: str | None = None
        try:
            await self._read_plan(device, poll)
        except UnitSilent:
            error = "no answer (timeout)"
        except UnitException as exc:
            error = str(exc)
        except LineDown as exc:
            # Not the unit's fault: the worker reconnects and polls everyone again.
            self.last_error = f"connection lost: {exc}"
            self._close()
            error = self.last_error
        ended = time.monotonic()
        device.last_cycle_seconds = ended - began
        device.done_lag.append(ended - due)
        device.polls += 1
        poll.ok = error is None
        await self._account(device, error)
        self._schedule(device, due)
        if poll.answers or poll.invalid:
            await self._sink(poll)

    async def _account(self, device: DeviceState, error: str | None) -> None:
        if error is None:
            device.consecutive_failures = 0
            device.last_success = time.time()
            await self._set_state(device, "online", None)
            return
        device.failures += 1
        device.consecutive_failures += 1
        device.last_error = error
        if self._client is None:
            await self._set_state(device, "disconnected", error)
        elif device.consecutive_failures >= device.config.failures_before_offline:
            if device.state != "offline":
                log.warning("modbus_device_offline", device=device.name, error=error)
            await self._set_state(device, "offline", error)

    @staticmethod
    def _schedule(device: DeviceState, due: float) -> None:
        interval = device.interval
        now = time.monotonic()
        missed = int((now - due) // interval) if now >= due + interval else 0
        device.overruns += missed
        device.next_due = due + (missed + 1) * interval

    async def _read_plan(self, device: DeviceState, poll: Poll) -> None:
        queue = list(device.requests)
        kept: list[Request] = []
        try:
            while queue:
                request = queue.pop(0)
                try:
                    data = await self._read(device, request)
                except UnitException as exc:
                    if exc.code != ILLEGAL_DATA_ADDRESS:
                        queue.insert(0, request)
                        raise
                    self._illegal_address(device, request, queue, poll)
                    continue
                except BaseException:
                    queue.insert(0, request)
                    raise
                kept.append(request)
                poll.answers.append((request, data))
        finally:
            # What was learnt (split requests, invalid points) is kept for the device.
            device.requests = kept + queue

    def _illegal_address(
        self, device: DeviceState, request: Request, queue: list[Request], poll: Poll
    ) -> None:
        parts = split(request)
        if parts:
            device.splits += 1
            log.warning(
                "modbus_read_split",
                device=device.name,
                request=request.describe(),
                into=len(parts),
                reason="illegal data address",
            )
            queue[:0] = parts
            return
        for point in request.points:
            device.invalid_points[point.name] = "illegal data address"
        poll.invalid.append((request, "illegal_data_address"))
        log.warning(
            "modbus_point_invalid",
            device=device.name,
            points=[p.name for p in request.points],
            request=request.describe(),
            reason="illegal data address",
        )

    async def _read(self, device: DeviceState, request: Request) -> list[int] | list[bool]:
        client = self._client
        if client is None or not client.connected:
            raise LineDown("not connected")
        read = getattr(client, _READ[request.table])
        attempts = 1 if device.state == "offline" else 1 + self.config.retries
        for _ in range(attempts):
            device.requests_sent += 1
            try:
                async with asyncio.timeout(self.config.timeout * 2 + 1):
                    answer = await read(
                        request.start, count=request.count, device_id=device.config.unit_id
                    )
            except ConnectionException as exc:
                raise LineDown(str(exc)) from exc
            except (ModbusIOException, TimeoutError):
                if not client.connected:
                    raise LineDown("connection closed by peer") from None
                await self._pause()
                continue
            await self._pause()
            self._silent = 0
            if answer.isError():
                raise UnitException(int(answer.exception_code), request)
            if request.bits:
                return list(answer.bits[: request.count])
            return list(answer.registers)
        self._silent += 1
        if self._silent >= SILENT_REQUESTS_BEFORE_RECONNECT:
            # Nobody on this line answered lately: the line (or gateway) may be wedged.
            self.last_error = "no unit answered the last requests"
            self._close()
        raise UnitSilent(request.describe())

    async def _pause(self) -> None:
        if self.config.pause_between_requests > 0:
            await asyncio.sleep(self.config.pause_between_requests)
