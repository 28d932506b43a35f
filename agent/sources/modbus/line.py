"""One Modbus connection on the wire: send a read, and say exactly what went wrong.

A :class:`Line` owns a pymodbus client and watches it through pymodbus's public trace
hooks (bytes received, PDUs sent, connection lost), so that a failed request can be told
apart by cause, and a unit's fault is never mistaken for a broken connection.

Fault kinds, what pymodbus 3.16 does with each (read from its transaction, framer and
decoder code), and what the line does:

- ``exception``: pymodbus returns an ``ExceptionResponse``. A unit fault.
- ``timeout``: no byte came; ``ModbusIOException`` after ``timeout``. A unit fault (on
  RTU framing followed by a resync, see below).
- ``wrong_transaction_id``: the framer skips a frame whose transaction id is not the
  request's, then times out. A unit fault; a frame of an earlier request that timed out
  is a late answer (counted), not a fault of the unit now asked.
- ``wrong_unit_id``: the framer skips a frame of another unit, then times out.
- ``garbage``: bytes that form no frame stay in pymodbus's buffer (emptied at the next
  send) until ``timeout``. A unit fault, then a resync.
- ``malformed``: a well-framed PDU pymodbus cannot decode raises inside
  ``data_received``, and asyncio then closes the transport. :class:`TolerantDecoder`
  hands it back as :class:`Undecodable`: a unit fault.
- ``wrong_function``: the PDU of that function code is returned (function 4 decodes as
  input registers for a read of holding registers). A unit fault.
- ``wrong_length``: fewer or more registers (bits) than asked are returned. A unit fault.
- connection lost: the pending request waits out its timeout (nothing fails it); the
  connection hook ends it at once with :class:`LineDown`.

Resync without reconnect is safe when the byte stream is still aligned on frames: Modbus
TCP frames carry their length and transaction id, pymodbus empties its receive buffer
before every request, and it skips frames of other transactions, so a late, foreign or
malformed answer costs only that request. Bytes that form no frame (``garbage``) may be
followed by more of the same: the line waits until the peer has been quiet for
``RESYNC_QUIET`` (at most ``timeout``), and the next request starts from an empty
buffer. RTU frames have no transaction id, so after an RTU timeout the line also waits
for quiet, so that a late answer is not taken for the next request's. A reconnect is the
only safe answer when the peer never goes quiet, or when requests keep getting garbage
with no good frame between them (the poller decides that, :mod:`.poller`).
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.pdu import DecodePDU, ModbusPDU

from agent.sources.modbus.config import ConnectionConfig
from agent.sources.modbus.planner import Request

RESYNC_QUIET = 0.05
"""Seconds without a received byte after which a garbled stream counts as quiet (about 50
characters at 9600 baud, well over the 3.5 character times that end an RTU frame)."""
LATE_TIDS = 32  # transaction ids of timed-out requests remembered to recognise late answers
FRAMES_SEEN = 64  # frame heads kept per attempt: enough to classify, bounded on a flood
FLOOD_BYTES = 8 * 260
"""More bytes than this for one request (eight of the largest Modbus frames) is no Modbus
conversation: the peer floods, and only a new connection stops what is in flight."""

Client = AsyncModbusTcpClient | AsyncModbusSerialClient

FUNCTION = {"coil": 1, "discrete_input": 2, "holding_register": 3, "input_register": 4}
_READ = {
    "coil": "read_coils",
    "discrete_input": "read_discrete_inputs",
    "holding_register": "read_holding_registers",
    "input_register": "read_input_registers",
}


class Fault(Exception):
    """A unit-level failure of one request: the connection still works.

    ``kind`` is one of the kinds in the module docstring (status ``errors`` counts them),
    ``code`` the exception code of an ``exception``, ``resync`` whether the stream may
    hold bytes of no frame, ``flood`` whether the peer sent more than ``FLOOD_BYTES``
    for the request, ``retry`` whether another attempt may help (the answer was lost or
    garbled, not wrong)."""

    def __init__(
        self, kind: str, message: str, *, code: int = 0, resync: bool = False, flood: bool = False
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.resync = resync
        self.flood = flood
        self.retry = kind in {"timeout", "garbage", "wrong_transaction_id", "wrong_unit_id"}


class LineDown(Exception):
    """The connection itself is gone (closed, reset, refused)."""


class Undecodable(ModbusPDU):
    """A frame whose PDU pymodbus could not decode, handed back instead of raised."""

    def __init__(self, frame: bytes) -> None:
        super().__init__()
        self.frame = frame


class TolerantDecoder(DecodePDU):
    """pymodbus's client decoder, except that an undecodable PDU becomes an
    :class:`Undecodable` answer. pymodbus raises instead, inside the protocol's
    ``data_received``, and asyncio answers that by closing the transport: one device
    sending a bad frame would cost every unit on the line a reconnect."""

    def decode(self, frame: bytes) -> ModbusPDU | None:
        """Decode a response PDU; never None for a complete frame."""
        pdu = super().decode(frame)
        return pdu if pdu is not None else Undecodable(frame)


@dataclass(frozen=True, slots=True)
class Hooks:
    """pymodbus's trace callbacks, through which a :class:`Line` watches its client,
    and ``received``, called with the size of every chunk the transport delivers."""

    packet: Callable[[bool, bytes], bytes]
    pdu: Callable[[bool, ModbusPDU], ModbusPDU]
    connect: Callable[[bool], None]
    received: Callable[[int], None]


def make_client(conf: ConnectionConfig, hooks: Hooks) -> Client:
    """The pymodbus client for a connection (retries, reconnects and decoding are ours)."""
    common: dict[str, Any] = {
        "timeout": conf.timeout,
        "retries": 0,
        "reconnect_delay": 0,
        "trace_packet": hooks.packet,
        "trace_pdu": hooks.pdu,
        "trace_connect": hooks.connect,
    }
    client: Client
    if conf.transport == "rtu":
        assert conf.serial_port is not None
        client = AsyncModbusSerialClient(
            conf.serial_port,
            framer=FramerType.RTU,
            baudrate=conf.baudrate,
            bytesize=conf.bytesize,
            parity=conf.parity,
            stopbits=conf.stopbits,
            **common,
        )
    else:
        assert conf.host is not None
        framer = FramerType.SOCKET if conf.transport == "tcp" else FramerType.RTU
        client = AsyncModbusTcpClient(conf.host, port=conf.port, framer=framer, **common)
    # pymodbus 3.16 attributes (ctx.framer.decoder and ctx.data_received here,
    # ctx.recv_buffer in Line._no_answer); tests/test_modbus_isolation.py pins the
    # behaviour they rely on.
    client.ctx.framer.decoder = TolerantDecoder(is_server=False)
    # trace_packet misses what pymodbus throws away unseen (a receive buffer over 264
    # bytes is emptied before framing): count every chunk, so a flood is not "silence".
    deliver = client.ctx.data_received

    def data_received(data: bytes) -> None:
        hooks.received(len(data))
        deliver(data)

    client.ctx.data_received = data_received  # type: ignore[method-assign]
    # pymodbus closes the connection after a few unanswered requests; a silent unit is
    # not a dead line, so the poller decides that (see .poller).
    client.set_max_no_responses(1 << 30)
    return client


ClientFactory = Callable[[ConnectionConfig, Hooks], Client]


def mbap_heads(data: bytes) -> list[tuple[int, int]]:
    """(transaction id, unit id) of each complete Modbus TCP frame at the start of
    ``data`` (pymodbus's receive buffer), up to the first bytes that are no frame."""
    heads: list[tuple[int, int]] = []
    at = 0
    while len(data) - at >= 8:
        tid, protocol, length, unit = struct.unpack_from(">HHHB", data, at)
        if protocol != 0 or length < 2 or len(data) - at < 6 + length:
            break
        heads.append((tid, unit))
        at += 6 + length
    return heads


class Line:
    """One connection's pymodbus client and what came over it."""

    def __init__(self, config: ConnectionConfig, factory: ClientFactory = make_client) -> None:
        self.config = config
        self._factory = factory
        self._client: Client | None = None
        self._deadline: asyncio.Timeout | None = None
        self._tcp = config.transport == "tcp"
        self._rx_bytes = 0
        self._attempt_rx = 0  # _rx_bytes when the current attempt began
        self._frames: list[tuple[int, int]] = []  # (transaction id, unit) seen this attempt
        self._last_rx = 0.0
        self._sent_tid = 0
        self._timed_out: deque[int] = deque(maxlen=LATE_TIDS)
        self.late_answers = 0
        """Answers that came after their request timed out (skipped, not faults)."""

    @property
    def connected(self) -> bool:
        """Whether the client holds an open transport."""
        return self._client is not None and self._client.connected

    async def open(self) -> None:
        """Connect a new client; raise :class:`LineDown` when that fails."""
        self.close()
        hooks = Hooks(self._on_packet, self._on_pdu, self._on_lost, self._on_received)
        client = self._factory(self.config, hooks)
        try:
            async with asyncio.timeout(self.config.timeout + 1):
                ok = await client.connect()
        except (TimeoutError, OSError, ConnectionException) as exc:
            client.close()
            raise LineDown(f"{type(exc).__name__}: {exc}") from exc
        if not ok:
            client.close()
            raise LineDown("connect failed")
        self._client = client
        self._timed_out.clear()  # transaction ids start again on a new connection

    def close(self) -> None:
        """Close the client, if any (idempotent)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    async def read(self, request: Request, unit: int) -> list[int] | list[bool]:
        """One attempt of ``request`` to ``unit``: its values, or :class:`Fault` /
        :class:`LineDown`."""
        client = self._client
        if client is None or not client.connected:
            raise LineDown("not connected")
        read = getattr(client, _READ[request.table])
        rx_before = self._attempt_rx = self._rx_bytes
        self._frames.clear()
        try:
            # pymodbus gives up after `timeout`; this is the backstop, and the hooks move
            # it to now when the connection is lost or floods (pymodbus would wait).
            async with asyncio.timeout(self.config.timeout * 2 + 1) as deadline:
                self._deadline = deadline
                answer = await read(request.start, count=request.count, device_id=unit)
        except ConnectionException as exc:
            raise LineDown(str(exc)) from exc
        except (ModbusIOException, TimeoutError):
            if not client.connected:
                raise LineDown("connection closed by peer") from None
            raise self._no_answer(client, unit, rx_before) from None
        finally:
            self._deadline = None
            self._count_late()
        return self._values(answer, request)

    async def resync(self) -> bool:
        """Wait until the peer has sent nothing for ``RESYNC_QUIET`` (the next request's
        send then drops what pymodbus buffered); False if it never went quiet within
        ``timeout``, or sent more than ``FLOOD_BYTES`` meanwhile."""
        give_up = time.monotonic() + self.config.timeout
        flood_at = self._rx_bytes + FLOOD_BYTES
        while True:
            now = time.monotonic()
            quiet_at = self._last_rx + RESYNC_QUIET
            if now >= quiet_at:
                return True
            if now >= give_up or self._rx_bytes > flood_at:
                return False
            await asyncio.sleep(min(quiet_at, give_up) - now)

    # ------------------------------------------------------------ classification

    def _no_answer(self, client: Client, unit: int, rx_before: int) -> Fault:
        """Why a request got no answer it could use, from what arrived meanwhile."""
        sent = self._sent_tid
        received = self._rx_bytes - rx_before
        left = client.ctx.recv_buffer  # what pymodbus could not frame
        mine = [u for t, u in self._frames if t == sent]
        foreign = [t for t, _ in self._frames if t != sent and t not in self._timed_out]
        self._timed_out.append(sent)
        if received > FLOOD_BYTES:
            return Fault(
                "garbage", f"{received} bytes for one request: a flood", resync=True, flood=True
            )
        if not received or (self._tcp and self._frames and not (left or mine or foreign)):
            # nothing, or only late answers to earlier requests (already skipped)
            return Fault("timeout", "no answer (timeout)", resync=not self._tcp)
        if left or not self._tcp:
            size = f"{len(left)} bytes" if left else "bytes"
            return Fault("garbage", f"{size} that form no Modbus frame", resync=True)
        if mine:
            return Fault("wrong_unit_id", f"answer from unit {mine[0]}, asked {unit} (skipped)")
        if foreign:
            return Fault(
                "wrong_transaction_id",
                f"answer with transaction id {foreign[0]}, sent {sent} (skipped)",
            )
        return Fault("garbage", "bytes that form no Modbus frame", resync=True)

    def _count_late(self) -> None:
        sent = self._sent_tid
        self.late_answers += sum(t != sent and t in self._timed_out for t, _ in self._frames)

    @staticmethod
    def _values(answer: ModbusPDU, request: Request) -> list[int] | list[bool]:
        """The answer's values, if it answers ``request``; else :class:`Fault`."""
        if isinstance(answer, Undecodable):
            raise Fault("malformed", f"undecodable answer {answer.frame[:16].hex()}")
        expected = FUNCTION[request.table]
        if answer.function_code & 0x7F != expected:
            raise Fault(
                "wrong_function",
                f"answer has function code {answer.function_code & 0x7F}, asked {expected}",
            )
        if answer.isError():
            code = int(answer.exception_code)
            raise Fault(
                "exception", f"exception code {code} on {request.table} {request.start}", code=code
            )
        if request.bits:
            # bits come in whole bytes: 8 * ceil(count / 8) of them
            if len(answer.bits) != -(-request.count // 8) * 8:
                raise Fault(
                    "wrong_length", f"answer holds {len(answer.bits)} bits, asked {request.count}"
                )
            return list(answer.bits[: request.count])
        if len(answer.registers) != request.count:
            raise Fault(
                "wrong_length",
                f"answer holds {len(answer.registers)} registers, asked {request.count}",
            )
        return list(answer.registers)

    # ------------------------------------------------------------ pymodbus hooks

    def _on_received(self, size: int) -> None:
        self._rx_bytes += size
        self._last_rx = time.monotonic()
        if self._rx_bytes - self._attempt_rx > FLOOD_BYTES:
            self._end_attempt()

    def _on_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending and self._tcp and len(self._frames) < FRAMES_SEEN:
            self._frames += mbap_heads(data)  # `data` is pymodbus's whole receive buffer
        return data

    def _on_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if sending:
            self._sent_tid = pdu.transaction_id
        return pdu

    def _on_lost(self, connected: bool) -> None:
        if not connected:
            self._end_attempt()

    def _end_attempt(self) -> None:
        """End the request in flight now (its outcome is classified as usual)."""
        deadline = self._deadline
        if deadline is not None and not deadline.expired():
            deadline.reschedule(asyncio.get_running_loop().time())
