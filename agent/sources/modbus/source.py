"""The Modbus source: poll workers in, ``meter_reading`` and ``event`` records out.

A poll is observed at the time it started, to the microsecond and strictly increasing
per source (an :class:`~agent.records.ArrivalClock`: two polls never share a time,
however the line is shared); each record's id covers its point, that time and what was
read (see :meth:`agent.records.Record.reading`).
Report-by-exception state is per point and stands only once the poll's records are
stored: a failed append rolls back that poll's points.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, ClassVar

import structlog

from agent.health import Component, Kind, parts, rollup
from agent.outbox import Quarantined
from agent.rbe import RbeFilter, RbeUndo, ReportByException
from agent.records import STATUS_CLOCK, ArrivalClock, EntityType, Record, format_observed
from agent.sources.base import Output, Source, SourceContext
from agent.sources.modbus.codec import DecodeError, decode_registers, scaled
from agent.sources.modbus.config import ModbusConfig, PointConfig
from agent.sources.modbus.planner import Request
from agent.sources.modbus.poller import ConnectionWorker, DeviceState, Poll

log = structlog.get_logger("agent.sources.modbus")

ON_CHANGE = ReportByException()  # events: report when the code changes


class ModbusSource(Source):
    """Polls Modbus devices over their connections and appends their readings."""

    system: ClassVar[str] = "modbus"

    def __init__(self, name: str, config: ModbusConfig, context: SourceContext) -> None:
        super().__init__(name, config, context)
        self.mconfig = config
        self.devices = {n: DeviceState(n, d) for n, d in config.devices.items()}
        self.workers: dict[str, ConnectionWorker] = {}
        self.rbe = RbeFilter()
        self.counters: Counter[str] = Counter()
        self._out: Output | None = None
        self._bad_points: set[str] = set()
        self._clock = ArrivalClock()

    async def run(self, out: Output) -> None:
        """Run one worker per connection that has devices, until cancelled."""
        self._out = out
        for conn_name, conn in self.mconfig.connections.items():
            devices = [d for d in self.devices.values() if d.config.connection == conn_name]
            if devices:
                self.workers[conn_name] = ConnectionWorker(
                    conn_name, conn, devices, sink=self._emit, on_state=self._device_state
                )
        if not self.workers:
            await asyncio.Event().wait()  # nothing to poll; stay up like any source
        async with asyncio.TaskGroup() as group:
            for worker in self.workers.values():
                group.create_task(worker.run(), name=f"modbus:{self.name}:{worker.name}")

    def health(self) -> Component:
        """The devices' healths and the source's from them (:func:`agent.health.rollup`:
        ``starting`` until a device answers, ``degraded`` while some do not, ``retrying``
        while none does)."""
        devices = parts(Kind.DEVICE, {n: d.tracker.health for n, d in self.devices.items()})
        self.tracker.set(*rollup(Kind.DEVICE, devices))
        return Component(Kind.SOURCE, self.name, self.tracker.health, devices)

    def status(self) -> dict[str, Any]:
        """Connections, devices and record counters."""
        return {
            "connections": {n: w.status() for n, w in self.workers.items()},
            "devices": {n: d.status() for n, d in self.devices.items()},
            "counters": {**self.counters, "rbe_suppressed": self.rbe.suppressed},
        }

    # ------------------------------------------------------------------ records

    def poll_records(self, poll: Poll, undo: RbeUndo) -> tuple[list[Record], list[Quarantined]]:
        """The records and bad inputs of one poll (report-by-exception applied; what it
        learnt goes into ``undo``). Nothing is written: :meth:`_emit` appends them,
        ``edge-agent tap`` shows them."""
        records: list[Record] = []
        bad: list[Quarantined] = []
        poll.observed_at = self._clock.stamp(poll.observed_at)
        for request, data in poll.answers:
            for point in request.points:
                record = self._point_record(poll, request, point, data, bad, undo=undo)
                if record is not None:
                    records.append(record)
        for request, reason in poll.invalid:
            bad += [self._quarantine(poll, request, p, reason, None) for p in request.points]
        return records, bad

    async def _emit(self, poll: Poll) -> None:
        undo = RbeUndo()
        records, bad = self.poll_records(poll, undo)
        if records or bad:
            assert self._out is not None
            try:
                await self._out.append(records, quarantine=bad)
            except BaseException:
                # Not stored (or not known to be): the next poll must report these
                # points again, not take them as reported.
                self.rbe.rollback(undo)
                raise
            self.counters["records"] += len(records)

    def _point_record(
        self,
        poll: Poll,
        request: Request,
        point: PointConfig,
        data: list[int] | list[bool],
        bad: list[Quarantined],
        *,
        undo: RbeUndo,
    ) -> Record | None:
        key = f"{poll.device.name}.{point.name}"
        offset = request.offset(point)
        chunk = data[offset : offset + point.width]
        try:
            raw = bool(chunk[0]) if request.bits else decode_registers(point, chunk)
        except (DecodeError, ValueError, IndexError) as exc:
            self.counters["decode_errors"] += 1
            if key not in self._bad_points:  # quarantine once per bad spell, count always
                self._bad_points.add(key)
                bad.append(self._quarantine(poll, request, point, f"decode: {exc}", chunk))
            return None
        self._bad_points.discard(key)
        if point.kind == "reading":
            return self._reading(poll, point, key, raw, undo)
        return self._event(poll, point, key, raw, undo)

    def _reading(
        self, poll: Poll, point: PointConfig, key: str, raw: Any, undo: RbeUndo
    ) -> Record | None:
        value = scaled(point, raw)
        at = poll.observed_at.timestamp()
        if not self.rbe.check(key, value, at, point.rbe, "good", undo):
            return None
        self.counters["readings"] += 1
        data: dict[str, Any] = {
            "asset_remote_id": poll.device.config.asset,
            "device": poll.device.name,
            "point": point.name,
            "value": value,
            "unit": point.unit,
            "quality": "good",
        }
        remote = {"unit_id": poll.device.config.unit_id, "table": point.table, "raw": raw}
        return Record.reading(
            self.ref, EntityType.METER_READING, key, poll.observed_at, data, remote_data=remote,
            stamped=self._clock.era,
        )  # fmt: skip

    def _event(
        self, poll: Poll, point: PointConfig, key: str, raw: Any, undo: RbeUndo
    ) -> Record | None:
        code = int(raw)
        previous = self.rbe.last_value(key)  # the code last reported (and rolled back with it)
        at = poll.observed_at.timestamp()
        if not self.rbe.check(key, code, at, point.rbe or ON_CHANGE, None, undo):
            return None
        self.counters["events"] += 1
        entry = point.codes.get(str(code))
        if entry is None:
            self.counters["unknown_codes"] += 1
        data: dict[str, Any] = {
            "asset_remote_id": poll.device.config.asset,
            "device": poll.device.name,
            "point": point.name,
            "event_type": point.kind,
            "raw_code": code,
            "code": entry.code if entry else f"unknown_{code}",
            "text": entry.text if entry else f"unknown {point.kind} code {code}",
            "severity": entry.severity if entry else point.unknown_severity,
            "previous_raw_code": previous,
        }
        return Record.reading(
            self.ref, EntityType.EVENT, key, poll.observed_at, data, stamped=self._clock.era
        )

    def _quarantine(
        self, poll: Poll, request: Request, point: PointConfig, reason: str, raw: Any
    ) -> Quarantined:
        self.counters["quarantined"] += 1
        context = {
            "device": poll.device.name,
            "unit_id": poll.device.config.unit_id,
            "point": point.name,
            "table": point.table,
            "address": point.address,
            "request": request.describe(),
            "raw": raw,
        }
        return Quarantined(self.name, reason, context)

    async def _device_state(self, device: DeviceState, state: str, reason: str | None) -> None:
        """A device changed state: tell upstream with a per-device connection_status."""
        self.health()  # the source's state changes now, not when someone looks
        if self._out is None or state == "unknown":
            return
        record = Record.entity(
            self.ref,
            EntityType.CONNECTION_STATUS,
            f"{self.name}/{device.name}",
            {
                "state": state,
                "reason": reason,
                "device": device.name,
                "asset_remote_id": device.config.asset,
                # strictly increasing microseconds: two changes never share a content
                "changed_at": format_observed(STATUS_CLOCK.stamp()),
            },
        )
        await self._out.append([record])
