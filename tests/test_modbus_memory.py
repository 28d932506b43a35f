"""A Modbus device cannot push the agent out of memory: frames are bounded by the protocol.

A Modbus TCP frame is at most 260 bytes (MBAP length is 16 bits, but a PDU is at most
253): pymodbus empties its receive buffer past its framer's ``MAX_SIZE`` (264) and
before each request, and the line keeps at most ``FRAMES_SEEN`` frame heads per
request. A raw TCP "device" floods the real source with what a broken or hostile
gateway could send; peak RSS of this process (kernel high-water mark,
tests/helpers/rss.py) stays within a few MiB while it sends tens of MiB.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

import pytest

from agent.sources.base import SourceContext
from agent.sources.modbus import ModbusConfig, ModbusSource
from tests.helpers.outputs import TestOutput
from tests.helpers.rss import MIB, RssPeak
from tests.helpers.tcppeer import TcpPeer
from tests.helpers.waiting import wait_for
from tests.modbus_sim import running

CTX = SourceContext(agent_id="test-agent", site="plant-1")
SENT = 32 * MIB
# The kernel's socket buffers hold what is sent and not yet read, outside the process;
# the agent holds at most a 256 KiB read, pymodbus's 264-byte buffer and the frame heads
# of one request. 16 MiB leaves room for the event loop and allocator, and is half of
# what the device sends.
BOUND = 16 * MIB


def _garbage(_request: bytes) -> bytes:
    return b"\xff" * 65536  # protocol id 0xffff: never a frame


def _frames_of_another_transaction(request: bytes) -> bytes:
    tid = (struct.unpack_from(">H", request)[0] + 1) & 0xFFFF
    frame = struct.pack(">HHHBBBH", tid, 0, 5, 1, 3, 2, 7)  # a valid answer, wrong tid
    return frame * (65536 // len(frame))


def _a_frame_that_never_ends(request: bytes) -> bytes:
    tid = struct.unpack_from(">H", request)[0]
    return struct.pack(">HHHB", tid, 0, 0xFFFF, 1) + b"\x03" * 65529


class Flood(TcpPeer):
    """A TCP device that answers anything with an endless stream of ``chunk(request)``."""

    def __init__(self, chunk: Callable[[bytes], bytes]) -> None:
        super().__init__()
        self.chunk = chunk
        self.sent = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Until the agent hangs up (a flood is a reason to)."""
        request = await reader.readexactly(12)  # MBAP + read request
        while True:
            data = self.chunk(request)
            writer.write(data)
            await writer.drain()
            self.sent += len(data)


def _config(port: int) -> ModbusConfig:
    conn = {"host": "127.0.0.1", "port": port, "timeout": 0.5, "retries": 0,
            "reconnect_initial": "10ms", "reconnect_max": "50ms"}  # fmt: skip
    # demoted after 3 failed polls it would be probed once a minute; this test wants
    # the flood to go on, so the device is demoted only after many, and probed often
    device = {"connection": "gw", "unit_id": 1, "interval": 0.05, "demote_after": 10**6,
              "demote_for": "50ms", "points": [{"name": "a", "address": 0}]}  # fmt: skip
    return ModbusConfig.model_validate(
        {"type": "modbus", "connections": {"gw": conn}, "devices": {"plc": device}}
    )


@pytest.mark.parametrize(
    "chunk", [_garbage, _frames_of_another_transaction, _a_frame_that_never_ends]
)
async def test_a_flooding_device_costs_the_agent_a_bounded_amount_of_memory(
    chunk: Callable[[bytes], bytes],
) -> None:
    flood = Flood(chunk)
    port = await flood.start()
    source = ModbusSource("line", _config(port), CTX)
    out = TestOutput()
    try:
        with RssPeak() as rss:
            async with running(source, out) as task:
                await wait_for(
                    lambda: flood.sent >= SENT or task.done(),
                    timeout=120,
                    what=f"{SENT // MIB} MiB sent",
                    detail=lambda: (flood.sent, flood.connections),
                )
                assert not task.done(), "the source stopped"
                status: dict[str, Any] = source.status()
    finally:
        await flood.stop()
    print(chunk.__name__, rss.describe(), f"connections {flood.connections}")  # -s
    assert rss.growth <= BOUND, rss.describe()
    assert out.records == []  # nothing of it became a reading
    device = status["devices"]["plc"]
    assert device["state"] != "ok", device
    assert flood.connections >= 2  # the agent closed flooded connections and reconnected
