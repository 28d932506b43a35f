"""``edge-agent tap`` for Modbus: one poll of every device (or of one), mapped.

Each connection is opened by the tap itself and every device on it polled once, with
the source's own read plan, decoding, scaling and code tables. A device that does not
answer (or answers with an exception) is shown as a bad input with the reason, never
left out silently. Nothing is written, and device states are not reported upstream.

Modbus TCP devices usually take several clients; a serial line (RTU) has one owner: stop
the service before tapping a source whose devices hang on a serial port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from agent.errors import ConfigError, TransientError
from agent.outbox import Quarantined
from agent.rbe import RbeUndo
from agent.sources.base import SourceContext, Tapped, TapRequest
from agent.sources.modbus.config import ConnectionConfig, ModbusConfig
from agent.sources.modbus.line import LineDown
from agent.sources.modbus.poller import ConnectionWorker, DeviceState, Poll
from agent.sources.modbus.source import ModbusSource


async def tap(
    name: str, config: ModbusConfig, context: SourceContext, request: TapRequest
) -> AsyncIterator[Tapped]:
    """The records and bad inputs of one poll of ``request.entity`` (a device name;
    default: every device), connection by connection. Raises :class:`TransientError`
    at the end when a connection could not be opened (after the others' results)."""
    source = ModbusSource(name, config, context)
    devices = source.devices
    if request.entity is not None:
        if request.entity not in devices:
            raise ConfigError(
                [("--entity", f"source {name!r} has no device {request.entity!r} "
                  f"(it has: {', '.join(devices) or 'none'})")]
            )  # fmt: skip
        devices = {request.entity: devices[request.entity]}
    down: list[str] = []
    for conn_name, conn in config.connections.items():
        on_line = [d for d in devices.values() if d.config.connection == conn_name]
        if not on_line:
            continue
        polls: list[Poll] = []

        async def keep(poll: Poll, polls: list[Poll] = polls) -> None:
            polls.append(poll)

        async def ignore(_device: DeviceState, _state: str, _reason: str | None) -> None:
            return None

        worker = ConnectionWorker(conn_name, conn, on_line, sink=keep, on_state=ignore)
        try:
            await worker.poll_once()
        except LineDown as exc:
            down.append(f"connection {conn_name!r} ({_where(conn)}): {exc}")
        for poll in polls:
            records, bad = source.poll_records(poll, RbeUndo())
            for record in records:
                yield record
            for item in bad:
                yield item
        for device in on_line:
            if device.polls and device.consecutive_failures:
                yield _failed(name, device)
    if down:
        raise TransientError("cannot poll: " + "; ".join(down))


def _failed(name: str, device: DeviceState) -> Quarantined:
    """A device whose poll failed, as a bad input with the reason."""
    kind = next(iter(device.errors), "failed")
    context = {
        "device": device.name,
        "unit_id": device.config.unit_id,
        "connection": device.config.connection,
        "error": device.last_error,
    }
    return Quarantined(name, f"poll_failed: {kind}", context)


def _where(conn: ConnectionConfig) -> str:
    return f"{conn.host}:{conn.port}" if conn.host else str(conn.serial_port)
