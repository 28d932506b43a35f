"""The MQTT client adapter: the one module that reaches into aiomqtt's and paho's internals.

aiomqtt 2.x (pinned ``<3``) drives paho 2.2 (pinned ``2.2.*``) on the event loop. The source
needs three things neither offers as an API; each private access below says why it is
needed, and nothing outside this module touches a private attribute of either library.

1. **Acknowledge after commit.** paho's ``manual_ack_set`` and ``ack`` are public, but
   aiomqtt keeps its paho client private (``Client._client``); aiomqtt has no manual-ack
   option yet (empicano/aiomqtt#345, PR #346).
2. **Messages without aiomqtt's queue.** paho's ``on_message`` is replaced by a callback
   that keeps the raw topic bytes (``MQTTMessage._topic``: the public ``topic`` decodes
   every one, and a non-UTF-8 topic must be quarantined, not raise inside paho), the
   payload, mid and QoS. The end of the connection is aiomqtt's ``_disconnected`` future,
   the one its own message iterator waits on.
3. **Stop reading while too much is held** (:meth:`Connection.pause`). aiomqtt registers
   its reader callback with the loop in paho's ``on_socket_open``; the adapter swaps it
   for one that does the same (paho's ``loop_read``, then what TLS has already
   decrypted) and stops between two packets while paused, so the broker's flow control
   takes over: its messages wait in the broker's queue and the socket's buffers. While
   paused, paho cannot read the broker's PINGRESP, and its keepalive check would close
   the connection one keepalive after its PINGREQ (``_check_keepalive`` and
   ``loop_misc``, driven by aiomqtt's misc task): so the check is suspended
   (``_keepalive = 0``, ``_ping_t = 0``; the public ``keepalive`` setter refuses a
   connected client), the adapter sends PINGREQs itself (``_send_simple_command``; paho's
   ``_send_pingreq`` would arm the PINGRESP timer that cannot be met) so the broker keeps
   the connection, and on resume paho's clock restarts (``_last_bytes_received``, under
   ``_msgtime_mutex``, the lock paho's own writers of that clock hold).

4. **PUBACK reason codes** (the MQTT sink, agent/sinks/mqtt.py). aiomqtt's ``publish``
   waits for the PUBACK but drops its MQTT 5 reason code, and a broker that refuses a
   message (not authorized, too large, quota exceeded) says so only there. :class:`Acks`
   publishes through aiomqtt's paho client (``Client._client``, as in 1) and wraps paho's
   public ``on_publish`` callback to hand each message's reason code to its future; the
   end of the connection is aiomqtt's ``_disconnected`` future, as in 2. It also keeps
   the CONNACK's Maximum Packet Size (wrapping the public ``on_connect``): paho does not
   hold a publish to it, and a broker drops a client that sends more.

Reconnecting instead of pausing was tried first and livelocked: on every reconnect the
broker re-sent its whole in-flight window, over the bound again at once (docs/mqtt.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

MessageHandler = Callable[[bytes, bytes | bytearray, int, int], None]
"""``(topic bytes, payload, mid, qos)`` for each message, on the event loop thread."""

PING_MIN_INTERVAL = 0.5


class Connection:
    """One :class:`aiomqtt.Client` adapted for the MQTT source (see the module docstring).

    Create it before ``async with client``: manual acknowledgement must be on before the
    CONNECT, since a persistent session delivers queued messages right after CONNACK.
    """

    def __init__(self, client: aiomqtt.Client, on_message: MessageHandler) -> None:
        self.client = client
        # (1) aiomqtt's paho client: manual acks and callbacks.
        self._paho: paho.Client = client._client
        self._loop = asyncio.get_running_loop()
        self.session_present: bool | None = None
        self.paused = False
        self.pauses = 0
        self.paused_since: float | None = None
        self._sock: Any = None  # the socket our reader serves, once adopted
        self._pinger: asyncio.Task[None] | None = None
        self._saved_keepalive = 0

        self._paho.manual_ack_set(True)

        def deliver(_client: Any, _userdata: Any, m: paho.MQTTMessage) -> None:
            on_message(m._topic, m.payload, m.mid, m.qos)  # (2) the raw topic bytes

        self._paho.on_message = deliver
        self._wrap_callbacks()

    def _wrap_callbacks(self) -> None:
        aio_connect: Any = self._paho.on_connect
        aio_open: Any = self._paho.on_socket_open
        aio_close: Any = self._paho.on_socket_close

        def on_connect(cl: Any, ud: Any, flags: Any, rc: Any, props: Any = None) -> None:
            self.session_present = bool(getattr(flags, "session_present", False))
            aio_connect(cl, ud, flags, rc, props)

        def on_socket_open(cl: Any, ud: Any, sock: Any) -> None:
            # Called on aiomqtt's connect thread: aiomqtt queues its add_reader (and its
            # misc task, paho's keepalive) with call_soon_threadsafe; queued after them,
            # _adopt runs after its add_reader and replaces that reader with ours.
            aio_open(cl, ud, sock)
            self._loop.call_soon_threadsafe(self._adopt, sock)

        def on_socket_close(cl: Any, ud: Any, sock: Any) -> None:
            aio_close(cl, ud, sock)  # removes the reader registered for the socket
            self._sock = None
            self._stop_pinger()

        self._paho.on_connect = on_connect
        self._paho.on_socket_open = on_socket_open
        self._paho.on_socket_close = on_socket_close

    def disable_paho_logger(self) -> None:
        """No debug line per packet (paho formats them even when nobody listens)."""
        self._paho.disable_logger()

    @property
    def disconnected(self) -> asyncio.Future[None]:
        """Done when the connection ended (with aiomqtt's error as its exception)."""
        future: asyncio.Future[None] = self.client._disconnected  # (2)
        return future

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge one message (PUBACK for QoS 1); in arrival order."""
        self._paho.ack(mid, qos)

    # ------------------------------------------------------------------ reading

    def _adopt(self, sock: socket.socket) -> None:
        if sock.fileno() < 0:
            return  # closed before we got here
        self._loop.remove_reader(sock.fileno())  # (3) aiomqtt's reader
        self._sock = sock
        if self.paused:
            self._stop_keepalive_check()
        else:
            self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        """aiomqtt's reader, plus the gate: paho reads one packet per call, and TLS may
        hold more decrypted bytes than the socket shows (paho#131)."""
        try:
            while not self.paused:
                self._paho.loop_read()
                sock = self._sock
                if sock is None or not (hasattr(sock, "pending") and sock.pending() > 0):
                    break
        except Exception as exc:  # a broken connection, as in aiomqtt's own reader
            if not self.disconnected.done():
                self.disconnected.set_exception(exc)

    def pause(self) -> None:
        """Stop reading from the broker, between two packets, until :meth:`resume`."""
        if self.paused:
            return
        self.paused = True
        self.pauses += 1
        self.paused_since = time.time()
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._stop_keepalive_check()

    def resume(self) -> None:
        """Read again (and at once what TLS has already decrypted)."""
        if not self.paused:
            return
        self.paused = False
        self.paused_since = None
        if self._sock is None:
            return
        self._stop_pinger()
        self._restart_keepalive_check()
        self._loop.add_reader(self._sock.fileno(), self._readable)
        self._loop.call_soon(self._readable)

    # ------------------------------------------------------------------ keepalive

    def _stop_keepalive_check(self) -> None:
        # (3) paho would close a connection whose PINGRESP it cannot read while paused.
        self._saved_keepalive = self._paho.keepalive
        self._paho._keepalive = 0
        self._paho._ping_t = 0
        if self._pinger is None:
            self._pinger = self._loop.create_task(self._ping(self._saved_keepalive))

    def _restart_keepalive_check(self) -> None:
        # (3) the broker's silence while we did not read says nothing about it; paho's
        # network thread (none here, but paho's own writers) take this lock for the clock
        with self._paho._msgtime_mutex:
            self._paho._last_bytes_received = paho.time_func()
        self._paho._ping_t = 0
        self._paho._keepalive = self._saved_keepalive

    async def _ping(self, keepalive: int) -> None:
        """While paused: a PINGREQ every half keepalive, so the broker (which closes a
        client silent for 1.5 keepalives) keeps the connection. Its PINGRESPs wait
        behind the unread messages and are read after the resume."""
        while True:
            await asyncio.sleep(max(PING_MIN_INTERVAL, keepalive / 2))
            self._paho._send_simple_command(paho.PINGREQ)  # (3) without arming _ping_t

    def _stop_pinger(self) -> None:
        task, self._pinger = self._pinger, None
        if task is not None:
            task.cancel()

    async def aclose(self) -> None:
        """Stop the pinger (the connection itself is closed by ``async with client``)."""
        task, self._pinger = self._pinger, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Acks:
    """QoS 1 publishes whose PUBACK reason code the caller awaits (see (4) above).

    Create it before ``async with client``. :meth:`publish` returns a future that resolves
    to the reason code (0 success, 0x10 no matching subscribers, >= 0x80 refused); it
    never resolves if the connection ends first: await it together with
    :attr:`disconnected`.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self._paho: paho.Client = client._client  # (4)
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._early: dict[int, int] = {}
        aio_publish: Any = self._paho.on_publish

        def on_publish(cl: Any, ud: Any, mid: int, rc: Any, props: Any = None) -> None:
            code = int(getattr(rc, "value", rc))
            future = self._pending.pop(mid, None)
            if future is None:
                self._early[mid] = code  # acknowledged before publish() returned
            elif not future.done():
                future.set_result(code)
            aio_publish(cl, ud, mid, rc, props)

        self._paho.on_publish = on_publish
        self.max_packet: int | None = None
        """The broker's Maximum Packet Size from its CONNACK (MQTT 5), if it sent one."""
        aio_connect: Any = self._paho.on_connect

        def on_connect(cl: Any, ud: Any, flags: Any, rc: Any, props: Any = None) -> None:
            size = getattr(props, "MaximumPacketSize", None)
            self.max_packet = size if isinstance(size, int) else None
            aio_connect(cl, ud, flags, rc, props)

        self._paho.on_connect = on_connect

    @property
    def disconnected(self) -> asyncio.Future[None]:
        """Done when the connection ended (with aiomqtt's error as its exception)."""
        future: asyncio.Future[None] = self.client._disconnected  # (4)
        return future

    def publish(self, topic: str, payload: bytes, properties: Any = None) -> asyncio.Future[int]:
        """Queue one QoS 1 message; the future gets its PUBACK reason code."""
        info = self._paho.publish(topic, payload, qos=1, properties=properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "could not publish")
        future: asyncio.Future[int] = self._loop.create_future()
        if info.mid in self._early:
            future.set_result(self._early.pop(info.mid))
        else:
            self._pending[info.mid] = future
        return future

    def fail_all(self, exc: BaseException) -> None:
        """End every awaited publish with ``exc`` (the sink is closing)."""
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)
