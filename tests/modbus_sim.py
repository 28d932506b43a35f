"""Test peers for the Modbus source: pymodbus's own server, a mute-unit proxy, a faulty
gateway.

The mute proxy sits between the client and a pymodbus server and forwards Modbus TCP
frames, except those addressed to a muted unit id, which it swallows without answering:
what a TCP gateway does when the RS-485 unit behind it is dead.

The faulty gateway is the same kind of proxy with one misbehaviour per unit id (exception
answers, silence, wrong transaction or unit ids, garbage, undecodable frames, wrong
function codes, short and late answers), and it can drop its TCP connections on demand
(an injected transport fault).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

from pymodbus import FramerType
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice


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
    """Forwards Modbus TCP frames to ``upstream_port``; never answers ``mute`` unit ids.
    With ``rtu``, the frames are RTU read requests (8 bytes: unit, function, address,
    count, CRC), as over an RTU-over-TCP gateway."""

    def __init__(self, upstream_port: int, mute: set[int], *, rtu: bool = False) -> None:
        self.upstream_port = upstream_port
        self.mute = mute
        self.rtu = rtu
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
                frame, unit = await self._request(reader)
                if unit in self.mute:
                    self.swallowed += 1
                    continue
                up_writer.write(frame)
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

    async def _request(self, reader: asyncio.StreamReader) -> tuple[bytes, int]:
        if self.rtu:
            frame = await reader.readexactly(8)
            return frame, frame[0]
        header = await reader.readexactly(7)
        _, _, length, unit = struct.unpack(">HHHB", header)
        return header + await reader.readexactly(length - 1), unit

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await src.read(4096):
                dst.write(data)
                await dst.drain()


GARBAGE = bytes.fromhex("deadbeef") * 4  # protocol id 0xbeef: no Modbus TCP frame at all
FAULTS = (
    "silent", "wrong_tid", "wrong_unit", "garbage", "truncated", "malformed",
    "wrong_function", "short", "late", "babble", "drop", "flood",
)  # fmt: skip
"""What :class:`FaultyGateway` can do to a unit, besides ``exception:<code>``."""


def mbap(tid: int, unit: int, pdu: bytes) -> bytes:
    """A Modbus TCP frame: MBAP header (transaction id, protocol 0, length, unit) + PDU."""
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


class FaultyGateway:
    """A Modbus TCP gateway in front of a pymodbus server, misbehaving per unit id.

    ``faults`` maps a unit id to what its "device" does (other units are forwarded
    faithfully): ``exception:<code>`` answers that exception code; ``silent`` never
    answers; ``wrong_tid`` / ``wrong_unit`` answer with another transaction / unit id;
    ``garbage`` answers bytes that are no frame; ``truncated`` sends a header promising
    more bytes than follow; ``malformed`` a well-framed PDU that cannot be decoded (byte
    count beyond the frame); ``wrong_function`` the right data under function code 4 for
    a read of holding registers; ``short`` one register less than asked; ``late`` the
    right answer, ``late_by`` seconds later; ``babble`` garbage every 5 ms from then on;
    ``drop`` resets the connection; ``flood`` sends well-formed frames of another
    transaction as fast as the client reads, from then on (``flooded`` counts the bytes).
    :meth:`drop_connections` resets every client
    connection: an injected transport fault. ``faults`` may be changed while running.
    """

    def __init__(self, upstream_port: int, faults: dict[int, str], *, late_by: float) -> None:
        self.upstream_port = upstream_port
        self.faults = faults
        self.late_by = late_by
        self.requests: Counter[int] = Counter()
        self.connections = 0
        self.dropped = 0
        self.flooded = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def drop_connections(self) -> None:
        """Close every client connection, as a gateway that reboots or resets TCP."""
        for writer in list(self._writers):
            writer.transport.abort()
            self.dropped += 1

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            while True:
                header = await reader.readexactly(7)
                tid, _, length, unit = struct.unpack(">HHHB", header)
                pdu = await reader.readexactly(length - 1)
                self.requests[unit] += 1
                fault = self.faults.get(unit, "")
                answer = await self._answer(fault, tid, unit, pdu, up_reader, up_writer)
                if fault == "drop":
                    writer.transport.abort()
                    self.dropped += 1
                    break
                if fault == "babble":
                    self._spawn(self._babble(writer))
                if fault == "flood":
                    self._spawn(self._flood(writer, unit))
                if answer is None:
                    continue
                if fault == "late":
                    self._spawn(self._later(writer, answer))
                else:
                    writer.write(answer)
                    await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            if up_writer is not None:
                up_writer.close()
            writer.close()
            self._tasks.discard(task)

    @staticmethod
    async def _babble(writer: asyncio.StreamWriter) -> None:
        while not writer.is_closing():
            writer.write(GARBAGE)
            await asyncio.sleep(0.005)

    async def _flood(self, writer: asyncio.StreamWriter, unit: int) -> None:
        block = mbap(0xBEEF, unit, bytes([3, 2, 0, 0])) * 8192  # 88 KiB of frames
        with contextlib.suppress(OSError):
            while not writer.is_closing():
                writer.write(block)
                await writer.drain()
                self.flooded += len(block)

    async def _later(self, writer: asyncio.StreamWriter, answer: bytes) -> None:
        await asyncio.sleep(self.late_by)
        if not writer.is_closing():
            writer.write(answer)

    async def _answer(
        self,
        fault: str,
        tid: int,
        unit: int,
        pdu: bytes,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> bytes | None:
        function = pdu[0]
        if fault in {"silent", "babble", "drop", "flood"}:
            return None
        if fault.startswith("exception:"):
            return mbap(tid, unit, bytes([function | 0x80, int(fault.split(":")[1])]))
        if fault == "garbage":
            return GARBAGE
        if fault == "truncated":
            return struct.pack(">HHHB", tid, 0, 200, unit) + bytes([function, 4, 0, 1])
        if fault == "malformed":
            return mbap(tid, unit, bytes([function, 200, 0, 1]))
        up_writer.write(mbap(tid, unit, pdu))
        await up_writer.drain()
        a_tid, _, length, a_unit = struct.unpack(">HHHB", await up_reader.readexactly(7))
        body = await up_reader.readexactly(length - 1)
        if fault == "wrong_tid":
            a_tid = (a_tid + 0x5555) % 0x10000 or 1
        elif fault == "wrong_unit":
            a_unit = (a_unit + 100) % 256
        elif fault == "wrong_function" and body[0] == 3:
            body = bytes([4]) + body[1:]
        elif fault == "short" and not body[0] & 0x80 and body[1] >= 2:
            body = bytes([body[0], body[1] - 2]) + body[2:-2]
        return mbap(a_tid, a_unit, body)


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
