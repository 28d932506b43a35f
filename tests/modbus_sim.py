"""Test peers for the Modbus source: pymodbus's own server, a mute-unit proxy, an output.

The mute proxy sits between the client and a pymodbus server and forwards Modbus TCP
frames, except those addressed to a muted unit id, which it swallows without answering:
what a TCP gateway does when the RS-485 unit behind it is dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Sequence
from typing import Any

from pymodbus import FramerType
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from agent.outbox import AppendResult, Cursor, Quarantined
from agent.records import Record


def sim_device(
    unit: int,
    *,
    holding: dict[int, Sequence[int]] | None = None,
    inputs: dict[int, Sequence[int]] | None = None,
    coils: dict[int, Sequence[bool]] | None = None,
    discrete: dict[int, Sequence[bool]] | None = None,
) -> SimDevice:
    """A device whose tables hold exactly the given blocks; other addresses are illegal."""

    def regs(blocks: dict[int, Sequence[int]] | None) -> list[SimData]:
        blocks = blocks or {0: [0]}
        return [
            SimData(a, values=list(v), datatype=DataType.REGISTERS)
            for a, v in sorted(blocks.items())
        ]

    def bits(blocks: dict[int, Sequence[bool]] | None) -> list[SimData]:
        blocks = blocks or {0: [False]}
        return [
            SimData(a, values=list(v), datatype=DataType.BITS) for a, v in sorted(blocks.items())
        ]

    return SimDevice(id=unit, simdata=(bits(coils), bits(discrete), regs(holding), regs(inputs)))


async def start_server(
    devices: list[SimDevice], port: int, framer: FramerType = FramerType.SOCKET
) -> ModbusTcpServer:
    server = ModbusTcpServer(devices, address=("127.0.0.1", port), framer=framer)
    await server.serve_forever(background=True)
    return server


class MuteProxy:
    """Forwards Modbus TCP frames to ``upstream_port``; never answers ``mute`` unit ids."""

    def __init__(self, upstream_port: int, mute: set[int]) -> None:
        self.upstream_port = upstream_port
        self.mute = mute
        self.swallowed = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except (OSError, asyncio.CancelledError):
            # stopped, or the device is down: close the client's side too, or its
            # transport is left for the garbage collector (a ResourceWarning later)
            writer.close()
            self._tasks.discard(task)
            return
        pump = asyncio.create_task(self._pump(up_reader, writer))
        try:
            while True:
                header = await reader.readexactly(7)
                _, _, length, unit = struct.unpack(">HHHB", header)
                body = await reader.readexactly(length - 1)
                if unit in self.mute:
                    self.swallowed += 1
                    continue
                up_writer.write(header + body)
                await up_writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
            up_writer.close()
            writer.close()
            self._tasks.discard(task)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await src.read(4096):
                dst.write(data)
                await dst.drain()


class MemoryOutput:
    """The source Output contract, in memory: what the source appended, in order."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.quarantined: list[Quarantined] = []
        self.changed = asyncio.Event()

    async def append(
        self,
        records: Sequence[Record],
        cursor: Cursor | None = None,
        *,
        dedupe: bool = False,
        quarantine: Sequence[Quarantined] = (),
    ) -> AppendResult:
        self.records += records
        self.quarantined += quarantine
        self.changed.set()
        return AppendResult(stored=len(records))

    async def cursor(self, source: str, key: str) -> Any | None:
        return None

    def readings(self, point: str) -> list[Record]:
        return [r for r in self.records if r.remote_id == point]

    def latest(self) -> dict[str, Any]:
        """Latest value per point id of meter readings."""
        return {
            r.remote_id: r.data["value"] for r in self.records if r.entity_type == "meter_reading"
        }


@contextlib.asynccontextmanager
async def running(source: Any, out: Any) -> AsyncIterator[asyncio.Task[None]]:
    """Run a source's ``run(out)`` in a task for the block; cancel and await it after."""
    task = asyncio.create_task(source.run(out))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
