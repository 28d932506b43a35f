"""Polling: one worker per connection, one request at a time, per-device schedules.

Each connection has a worker task that owns its :class:`~.line.Line`. It polls whichever
device is due next; a device's slots are anchored to its start time (no drift), and a
poll that runs past the next slot skips it (counted as an overrun, never stacked).

A bad unit must never cost a good one its polls, so the line time a unit can take is
bounded and good units go first:

* Standing: a unit that answered its last poll gets ``retries`` extra attempts per
  request; any other unit (not answered yet, or failed its last poll) one attempt. A
  poll stops at the unit's first failed request.
* Demotion (as Kepware's auto-demotion): after ``demote_after`` consecutive failed polls
  a unit is ``demoted`` and probed once every ``demote_for``, one attempt, until it
  answers; a dead unit then costs its line one ``timeout`` per ``demote_for``.
* Priority: of the units that are due, those that answered their last poll go first,
  then failing ones, then demoted probes; a good unit waits for at most the one poll in
  flight.
* A unit's fault is not the line's (:mod:`.line` tells them apart). The connection is
  re-opened only when the transport broke, when the byte stream cannot be resynchronised
  (a peer that floods or never goes quiet, or ``GARBLED_BEFORE_REOPEN`` garbled answers
  in a row with no good frame between), or when no unit answers at all (every unit failed its
  latest poll and the last ``SILENT_BEFORE_REOPEN`` requests got no byte back: a wedged
  gateway). pymodbus's own auto-reconnect and "close after N silent requests" are off.
  After a re-open that brings no answer, the next one waits (full-jitter backoff).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from agent import tasks
from agent.backoff import Backoff
from agent.health import State, Tracker
from agent.sources.modbus.config import ConnectionConfig, DeviceConfig
from agent.sources.modbus.line import ClientFactory, Fault, Line, LineDown, make_client
from agent.sources.modbus.planner import Request, plan, split

log = structlog.get_logger("agent.sources.modbus")

ILLEGAL_DATA_ADDRESS = 2
SILENT_BEFORE_REOPEN = 3
GARBLED_BEFORE_REOPEN = 3
JITTER_SAMPLES = 1024
ANSWERED = frozenset(
    {"exception", "malformed", "wrong_function", "wrong_length", "wrong_transaction_id",
     "wrong_unit_id"}
)  # fmt: skip
"""Fault kinds that prove the line carries frames (unlike ``timeout`` and ``garbage``)."""


@dataclass(slots=True)
class Poll:
    """What one poll of a device read: per request, its raw answer."""

    device: DeviceState
    observed_at: datetime
    answers: list[tuple[Request, list[int] | list[bool]]]
    invalid: list[tuple[Request, str]] = field(default_factory=list)
    ok: bool = True


DEVICE_HEALTH = {
    "unknown": State.STARTING,
    "online": State.OK,
    "demoted": State.RETRYING,
    "offline": State.RETRYING,
}
"""What a device's own state word means (agent.health): a demoted or offline device
moves no data and is retried."""


@dataclass
class DeviceState:
    """A device's plan, schedule, standing and figures (shown in status).

    ``state``: ``unknown`` until its first answer, ``online`` while it answers,
    ``demoted`` after ``demote_after`` consecutive failed polls (probed every
    ``demote_for``), ``offline`` while its connection is down. That word goes upstream
    in the device's ``connection_status`` records; ``tracker`` holds what it means
    (:data:`DEVICE_HEALTH`) for readiness, status and metrics."""

    name: str
    config: DeviceConfig
    requests: list[Request] = field(default_factory=list)
    state: str = "unknown"
    tracker: Tracker = field(
        default_factory=lambda: Tracker(State.STARTING, "no answer yet", detail="unknown")
    )
    next_due: float = 0.0
    polls: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    demotions: int = 0
    overruns: int = 0
    splits: int = 0
    requests_sent: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    """Failed polls by fault kind (see .line), plus ``connection_lost``."""
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
    def answering(self) -> bool:
        """Whether the unit answered its latest poll (good standing: retries, priority)."""
        return self.consecutive_failures == 0 and self.last_success is not None

    @property
    def demoted(self) -> bool:
        """Whether the unit failed ``demote_after`` polls in a row (probed slowly)."""
        return self.consecutive_failures >= self.config.demote_after

    @property
    def rank(self) -> int:
        """Poll priority among due units: 0 answering, 1 failing, 2 demoted."""
        return 0 if self.answering else 2 if self.demoted else 1

    @property
    def interval(self) -> float:
        """The current poll period (``demote_for`` while demoted)."""
        return self.config.demote_for if self.demoted else self.config.interval

    def status(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return {
            **self.tracker.health.as_dict(),
            "unit_id": self.config.unit_id,
            "polls": self.polls,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "demotions": self.demotions,
            "errors": dict(self.errors),
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


Sink = Callable[[Poll], Awaitable[None]]
StateChange = Callable[[DeviceState, str, str | None], Awaitable[None]]


class ConnectionWorker:
    """Owns one connection's line and polls its devices one request at a time."""

    def __init__(
        self,
        name: str,
        config: ConnectionConfig,
        devices: list[DeviceState],
        *,
        sink: Sink,
        on_state: StateChange,
        client_factory: ClientFactory = make_client,
    ) -> None:
        self.name = name
        self.config = config
        self.devices = devices
        self._sink = sink
        self._on_state = on_state
        self._line = Line(config, client_factory)
        self._silent = 0  # attempts in a row that got no byte back
        self._garbled = 0  # garbled answers in a row, no good frame between
        self._answered = False  # something answered on the current connection
        self.state = "connecting"
        self.connects = 0
        self.reconnects = 0
        self.resyncs = 0
        self.reopened: Counter[str] = Counter()
        """Why connections that were open got closed and opened again."""
        self.last_error: str | None = None

    def status(self) -> dict[str, Any]:
        """JSON-ready figures of the connection (``state`` as in :mod:`agent.health`:
        ``starting`` before its first connect, ``ok`` connected, ``retrying`` else; its
        own word in ``detail``)."""
        if self.state == "connected":
            state = State.OK
        elif self.state == "connecting" and self.connects == 0 and self.last_error is None:
            state = State.STARTING
        else:
            state = State.RETRYING
        return {
            "state": state.value,
            "detail": self.state,
            "transport": self.config.transport,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "reopened": dict(self.reopened),
            "resyncs": self.resyncs,
            "late_answers": self._line.late_answers,
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
        wait_first = False
        try:
            while True:
                tasks.raise_if_cancelling()  # a lost stop (see agent.tasks)
                if not self._line.connected:
                    if self.state == "connected":  # dropped between polls
                        self._reopen("connection_lost", "connection lost: closed by peer")
                    if wait_first:
                        await tasks.sleep(backoff.delay())
                    wait_first = True  # until something answers on the new connection
                    if not await self._connect():
                        continue
                if self._answered:
                    backoff.reset()
                    wait_first = False
                device = self._next_device()
                wait = device.next_due - time.monotonic()
                if wait > 0:
                    await tasks.sleep(wait)
                    continue  # choose again: others may be due by now
                await self._poll(device)
        finally:
            self._line.close()

    async def poll_once(self) -> None:
        """Open the connection and poll every device once, in order (``edge-agent
        tap``); each poll goes to the sink, its outcome into the device's figures
        (``last_error``). Raises :class:`LineDown` when the connection cannot be opened."""
        try:
            for device in self.devices:
                if not self._line.connected:  # first, or lost during the previous poll
                    await self._line.open()
                    self.state = "connected"
                await self._poll(device)
        finally:
            self._line.close()

    def _next_device(self) -> DeviceState:
        """The due device of best rank (then the longest due), else the next one due."""
        now = time.monotonic()
        due = [d for d in self.devices if d.next_due <= now]
        if due:
            return min(due, key=lambda d: (d.rank, d.next_due))
        return min(self.devices, key=lambda d: d.next_due)

    async def _connect(self) -> bool:
        if self.state != "disconnected":  # stays so while retrying (logged once)
            self.state = "connecting"
        try:
            await self._line.open()
        except LineDown as exc:
            self.last_error = str(exc)
            await self._line_down(self.last_error)
            return False
        self.state, self._silent, self._garbled, self._answered = "connected", 0, 0, False
        self.reconnects += self.connects > 0
        self.connects += 1
        now = time.monotonic()
        for device in self.devices:
            device.next_due = max(device.next_due, now)  # overdue devices poll at once
        log.info("modbus_connected", connection=self.name, transport=self.config.transport)
        return True

    def _reopen(self, why: str, error: str) -> None:
        """Close a connection that was open; the run loop opens a new one."""
        self.reopened[why] += 1
        self.last_error = error
        self.state = "connecting"
        log.warning("modbus_connection_reopen", connection=self.name, reason=why, error=error)
        self._line.close()

    async def _line_down(self, error: str) -> None:
        if self.state != "disconnected":
            log.warning("modbus_connection_failed", connection=self.name, error=error)
        self.state = "disconnected"
        for device in self.devices:
            device.last_error = error
            await self._set_state(device, "offline", error)

    async def _set_state(self, device: DeviceState, state: str, reason: str | None) -> None:
        if device.state != state:
            old, device.state = device.state, state
            device.tracker.set(DEVICE_HEALTH[state], reason, state)
            log.info("modbus_device_state", device=device.name, old=old, new=state, reason=reason)
            await self._on_state(device, state, reason)

    async def _poll(self, device: DeviceState) -> None:
        due = device.next_due
        began = time.monotonic()
        device.jitter.append(max(0.0, began - due))
        poll = Poll(device, datetime.now(UTC), [])
        fault: Fault | None = None
        lost: str | None = None
        try:
            await self._read_plan(device, poll)
        except Fault as exc:
            fault = exc
        except LineDown as exc:
            # Not the unit's fault: the worker reconnects and polls everyone again.
            lost = f"connection lost: {exc}"
            self._reopen("connection_lost", lost)
        ended = time.monotonic()
        device.last_cycle_seconds = ended - began
        device.done_lag.append(ended - due)
        device.polls += 1
        poll.ok = fault is None and lost is None
        await self._account(device, fault, lost)
        self._schedule(device, due)
        if poll.answers or poll.invalid:
            await self._sink(poll)

    async def _account(self, device: DeviceState, fault: Fault | None, lost: str | None) -> None:
        if fault is None and lost is None:
            device.consecutive_failures = 0
            device.last_success = time.time()
            await self._set_state(device, "online", None)
            return
        device.failures += 1
        if fault is None:
            device.errors["connection_lost"] += 1  # not counted against the unit
            device.last_error = lost
            return
        device.errors[fault.kind] += 1
        device.consecutive_failures += 1
        device.last_error = str(fault)
        if device.consecutive_failures == 1:  # the first of a spell; demotion warns
            log.info("modbus_poll_failed", device=device.name, fault=fault.kind, error=str(fault))
        if device.demoted and device.state != "demoted":
            device.demotions += 1
            log.warning(
                "modbus_device_demoted",
                device=device.name,
                fault=fault.kind,
                error=str(fault),
                failed_polls=device.consecutive_failures,
                probe_every=device.config.demote_for,
            )
            await self._set_state(device, "demoted", str(fault))

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
                except Fault as exc:
                    if exc.kind != "exception" or exc.code != ILLEGAL_DATA_ADDRESS:
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
        attempts = 1 + self.config.retries if device.answering else 1
        while True:
            attempts -= 1
            device.requests_sent += 1
            try:
                data = await self._line.read(request, device.config.unit_id)
            except Fault as fault:
                await self._pause()
                await self._after_fault(fault)
                if fault.retry and attempts > 0 and self._line.connected:
                    continue
                raise
            await self._pause()
            self._silent = self._garbled = 0
            self._answered = True
            return data

    async def _after_fault(self, fault: Fault) -> None:
        """Track what the fault says about the line; resync or re-open it if needed."""
        self._silent = self._silent + 1 if fault.kind == "timeout" else 0
        if fault.kind in ANSWERED:
            self._garbled = 0
            self._answered = True
        elif fault.kind == "garbage":
            self._garbled += 1
        if fault.flood:
            self._reopen("garbage", str(fault))
            return
        if fault.resync:
            self.resyncs += 1
            if not await self._line.resync():
                self._reopen("garbage", f"the peer kept sending after: {fault}")
                return
        if self._garbled >= GARBLED_BEFORE_REOPEN:
            self._reopen("garbage", f"{self._garbled} garbled answers in a row: {fault}")
        elif self._silent >= SILENT_BEFORE_REOPEN and all(
            d.polls and d.consecutive_failures for d in self.devices
        ):
            # Nobody on this line answers: the line (or gateway) may be wedged.
            self._reopen("silent", "no unit answered the last requests")

    async def _pause(self) -> None:
        if self.config.pause_between_requests > 0:
            await asyncio.sleep(self.config.pause_between_requests)
