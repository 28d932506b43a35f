"""The MQTT source: one broker connection, QoS 1 persistent session, ack after commit.

No-loss protocol: paho's manual acknowledgement is switched on before connecting, so a
QoS 1 message is acknowledged (PUBACK) only after ``await out.append(...)`` returned for
the records (and quarantine entries) it produced. Messages that arrive during one commit
are mapped and committed together in the next append, then acknowledged in arrival order
(MQTT requires PUBACKs in the order the PUBLISHes came).
A crash before the PUBACK makes the broker redeliver from the persistent session; the
deterministic record ids make that redelivery a duplicate the upstream drops (a message
without a timestamp of its own is observed at its arrival, so its redelivery is a second
observation: a record more, never one lost).

aiomqtt 2.x has no manual-ack option yet, and nothing to stop reading while commits
wait: :mod:`agent.sources.mqtt.client` adapts it (the one module that touches aiomqtt's
and paho's internals, and says why). Its message callback replaces aiomqtt's message
queue (see ``_consume``); all of it runs on the event loop thread, where aiomqtt drives
paho. aiomqtt still connects, subscribes, reconnects and reports disconnection.

Memory is bounded for every QoS: when the bytes received and not yet committed reach
``max_held_bytes``, the source stops reading from the broker (the broker queues) until
commits bring them under half of it; MQTT 5's Maximum Packet Size
(``max_packet_bytes``) bounds the one message being read.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import ssl
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import tasks
from agent.backoff import Backoff
from agent.configtypes import secret_value
from agent.errors import OutboxWriteError
from agent.health import State
from agent.outbox import Cursor, Quarantined
from agent.rbe import RbeUndo
from agent.records import Record
from agent.sources.base import Output, Source, SourceConfig, SourceContext
from agent.sources.mqtt.client import Connection
from agent.sources.mqtt.config import MqttConfig, TlsConfig
from agent.sources.mqtt.mapping import ALIAS_CURSOR_KEY, Mapper, Outcome, _preview

log = structlog.get_logger("agent.sources.mqtt")

# Test-only hook: when set to 1, committed messages are never acknowledged, which makes
# the crash window "committed but not acknowledged" deterministic for the no-loss tests.
# Never set it in production: the broker would redeliver everything at every reconnect.
TEST_HOLD_ACKS_ENV = "EDGE_AGENT_TEST_MQTT_HOLD_ACKS"

SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason code 0x8E
# Messages mapped between two yields to the event loop (see MqttSource._map_batch).
MAP_SLICE = 250
_PAHO_LOGGER = "mqtt"  # aiomqtt's default logger for paho


def _reason_code(exc: BaseException) -> int | None:
    """The MQTT reason code behind an aiomqtt error, if there is one."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        rc = getattr(cur, "rc", None)
        if rc is not None:
            return _code(rc)
        cur = cur.__cause__ or cur.__context__
    return None


def _code(value: Any) -> int:
    """A reason code or granted QoS (paho gives ReasonCode objects or ints)."""
    return int(getattr(value, "value", value))


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__
    text = f"{type(exc).__name__}: {exc}"
    return f"{text} ({type(cause).__name__}: {cause})" if cause is not None else text


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when the handshake fails.

    paho 2.2 drops the socket of a failed TLS handshake without closing it, so each
    failed reconnect (untrusted or expired broker certificate) would leak a descriptor
    until garbage collection.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """The TLS context of a broker connection (the source's and ``edge-agent tap``'s)."""
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    ctx.sslsocket_class = _ClosingSSLSocket
    if tls.cert_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass
class _Batch:
    """Messages not yet committed, in arrival order (mapped by the committer)."""

    acks: list[tuple[int, int]] = field(default_factory=list)  # (mid, qos)
    # (topic, payload, arrival time): what on_message keeps until the committer maps it
    raw: list[tuple[bytes, bytes | bytearray, float]] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    bad: list[Quarantined] = field(default_factory=list)
    cursor: Cursor | None = None
    suppressed: int = 0
    held: int = 0  # bytes counted against max_held_bytes until the batch is committed


# What a held message costs beyond its topic and payload bytes (tuples, floats, list
# slots), counted against max_held_bytes so many tiny messages are bounded too.
HELD_OVERHEAD = 200


@dataclass
class _Pipe:
    """Between paho's callback and the committer of one connection: batches, oldest first.

    ``on_message`` adds to the newest batch until it holds ``batch_max_messages``; the
    committer takes the oldest. ``held`` counts the bytes of everything received and not
    yet committed: at ``max_held_bytes`` the connection stops reading (any QoS) until
    commits bring it under half of that (see ``MqttSource._on_message``).
    """

    conn: Connection | None = None

    batches: deque[_Batch] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # a batch is waiting
    committing: bool = False
    closed: bool = False  # its session ended: a late message is left to redelivery
    held: int = 0  # bytes of the messages received and not yet committed (HELD_OVERHEAD)
    held_messages: int = 0
    over_limit_logged: bool = False

    def open_batch(self, limit: int) -> _Batch:
        """The batch new messages go to (a new one when the newest is full)."""
        if not self.batches or len(self.batches[-1].acks) >= limit:
            self.batches.append(_Batch())
        return self.batches[-1]


class MqttSource(Source):
    """Subscribes to one broker; see :mod:`agent.sources.mqtt`."""

    system = "mqtt"

    def __init__(self, name: str, config: SourceConfig, context: SourceContext) -> None:
        super().__init__(name, config, context)
        assert isinstance(config, MqttConfig)
        self.cfg = config
        self.mapper = Mapper(self.ref, config)
        self.counters: Counter[str] = Counter()
        self.connected = False
        self.tracker.set(State.STARTING, "not connected yet")
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_message_at: float | None = None
        self.connected_since: float | None = None
        self.session_present: bool | None = None
        self.clash_suspected = False
        self._short_streak = 0
        self._hold_acks = os.environ.get(TEST_HOLD_ACKS_ENV) == "1"
        self._pipe: _Pipe | None = None  # the current connection's

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """Connection state, last error, last message time and counters."""
        counters = dict(self.counters)
        bad = dict(self.mapper.counters)
        conn = None if self._pipe is None or self._pipe.closed else self._pipe.conn
        return {
            "connected": self.connected,
            "broker": f"{self.cfg.host}:{self.cfg.port}",
            "client_id": self.cfg.client_id,
            "connected_since": self.connected_since,
            "session_present": self.session_present,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "last_message_at": self.last_message_at,
            "client_id_clash_suspected": self.clash_suspected,
            "counters": counters,
            "held_bytes": 0 if self._pipe is None or self._pipe.closed else self._pipe.held,
            "held_messages": (
                0 if self._pipe is None or self._pipe.closed else self._pipe.held_messages
            ),
            "reading_paused": conn is not None and conn.paused,
            "reading_paused_since": None if conn is None else conn.paused_since,
            "input_problems": bad,
            "subscriptions": {
                topic: {"messages": n, "quarantined": q}
                for topic, (n, q) in self.mapper.by_subscription.items()
            },
            "rbe_suppressed": self.mapper.rbe.suppressed,
            "sparkplug_sequence_gaps": self.mapper.sequence_gaps,
        }

    # ------------------------------------------------------------------ run

    async def run(self, out: Output) -> None:
        """Connect, consume and reconnect with jittered backoff until cancelled."""
        self.mapper.restore_aliases(await out.cursor(self.name, ALIAS_CURSOR_KEY))
        backoff = Backoff(self.cfg.reconnect_initial, self.cfg.reconnect_cap)
        while True:
            tasks.raise_if_cancelling()  # a stop lost inside aiomqtt (see agent.tasks)
            started = time.monotonic()
            if self.last_error is None:  # the first connect: nothing proven yet
                broker = f"{self.cfg.host}:{self.cfg.port}"
                self.tracker.set(State.STARTING, f"connecting to {broker}", "connecting")
            try:
                await self._session(out)
            except aiomqtt.MqttError as exc:
                self._failed(exc, "connection")
            except OutboxWriteError as exc:
                # Nothing of the batch was stored nor acknowledged: reconnect, and the
                # broker redelivers it (RBE was rolled back when the session ended).
                self._failed(exc, "outbox")
            finally:
                self.connected = False
            lived = time.monotonic() - started
            self._after_disconnect(lived, backoff)
            delay = backoff.delay(at_least=self.cfg.reconnect_initial / 10)
            self.tracker.set(State.RETRYING, self.last_error, "reconnecting")
            log.info("mqtt_reconnect_scheduled", source=self.name, delay=round(delay, 2))
            await tasks.sleep(delay)

    def _failed(self, exc: BaseException, where: str) -> None:
        self.last_error = _describe(exc)
        self.last_error_at = time.time()
        self.counters[f"errors_{where}"] += 1
        rc = _reason_code(exc)
        if rc == SESSION_TAKEN_OVER:
            self.counters["session_taken_over"] += 1
            self.clash_suspected = True
            log.error(
                "mqtt_client_id_clash_suspected",
                source=self.name,
                client_id=self.cfg.client_id,
                detail="broker says another client connected with the same client id "
                "(session taken over); give each agent its own client_id",
            )
        log.warning(
            "mqtt_disconnected",
            source=self.name,
            error=self.last_error,
            reason_code=rc,
            was_connected_for=None
            if self.connected_since is None
            else round(time.time() - self.connected_since, 1),
        )

    def _after_disconnect(self, lived: float, backoff: Backoff) -> None:
        """Backoff and client-id clash bookkeeping after a session ended."""
        was_connected = self.connected_since is not None
        self.connected_since = None
        if lived >= self.cfg.stable_after:
            backoff.reset()
            self._short_streak = 0
            return
        if not was_connected:
            return  # a failed connect is not a kick-off
        self._short_streak += 1
        self.counters["short_connections"] += 1
        if self._short_streak >= self.cfg.clash_threshold:
            self.clash_suspected = True
            if self._short_streak == self.cfg.clash_threshold:
                log.error(
                    "mqtt_client_id_clash_suspected",
                    source=self.name,
                    client_id=self.cfg.client_id,
                    short_connections=self._short_streak,
                    detail="the broker keeps closing the connection shortly after connect; "
                    "most likely another client uses the same client_id",
                )

    # ------------------------------------------------------------------ session

    async def _session(self, out: Output) -> None:
        client, pipe = await self._client()
        self._pipe = pipe
        conn = pipe.conn
        assert conn is not None
        try:
            async with client:
                self.session_present = conn.session_present
                await self._connected(client, pipe, out)
        finally:
            pipe.closed = True
            await conn.aclose()
            undo = self.mapper.rbe_undo
            if pipe.committing and undo is not None:
                # A batch was mapped (RBE learnt from it) but not acknowledged: the broker
                # redelivers it, and RBE must not suppress the redelivery. Batches still
                # waiting were never mapped and taught RBE nothing; other points keep
                # their state.
                self.mapper.rbe.rollback(undo)
            self.mapper.rbe_undo = None

    async def _connected(self, client: aiomqtt.Client, pipe: _Pipe, out: Output) -> None:
        tasks.raise_if_cancelling()  # the connect may have swallowed a stop
        self.connected = True
        self.connected_since = time.time()
        self.counters["connects"] += 1
        log.info(
            "mqtt_connected",
            source=self.name,
            broker=f"{self.cfg.host}:{self.cfg.port}",
            protocol=self.cfg.protocol,
            client_id=self.cfg.client_id,
            session_present=self.session_present,
        )
        if self.counters["connects"] > 1 and self.session_present is False:
            log.warning(
                "mqtt_session_not_present",
                source=self.name,
                detail="the broker had no session for this client id: messages "
                "published while disconnected may be missing (session expired, "
                "broker restarted without persistence, or a client id clash)",
            )
        await self._subscribe(client)
        tasks.raise_if_cancelling()  # so may the subscribe
        self.tracker.set(State.OK)
        if self._short_streak < self.cfg.clash_threshold:
            self.clash_suspected = False
        await self._consume(client, pipe, out)

    async def _client(self) -> tuple[aiomqtt.Client, _Pipe]:
        c = self.cfg
        v5 = c.protocol == "5"
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = min(int(c.session_expiry), 0xFFFFFFFF)
            props.ReceiveMaximum = c.receive_maximum
            # The broker never sends a larger packet (it drops the message instead): the
            # bound on the one message paho reads whole before handing it over.
            props.MaximumPacketSize = c.packet_limit
        tls = await asyncio.to_thread(self._tls_context) if c.tls is not None else None
        client = aiomqtt.Client(
            c.host,
            c.port,
            username=c.username,
            password=secret_value(c.password),
            identifier=c.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else False,
            # 3.1.1 takes clean_session; paho refuses clean_start there unless left default.
            clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            keepalive=max(1, int(c.keepalive)),
            timeout=c.connect_timeout,
            properties=props,
            tls_context=tls,
            tls_insecure=True if c.tls is not None and c.tls.insecure_skip_verify else None,
        )
        # paho's callback keeps each message in this client's own pipe (see _consume): a
        # late callback of an old connection can never reach a newer committer.
        pipe = _Pipe()
        pipe.conn = Connection(client, functools.partial(self._on_message, pipe))
        if not logging.getLogger(_PAHO_LOGGER).isEnabledFor(logging.DEBUG):
            # its errors reach us as aiomqtt exceptions anyway
            pipe.conn.disable_paho_logger()
        return client, pipe

    def _tls_context(self) -> ssl.SSLContext:
        assert self.cfg.tls is not None
        return tls_context(self.cfg.tls)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        subs = self.cfg.subscriptions
        topics: list[tuple[str, Any]]
        if self.cfg.protocol == "5":
            # Retained messages only for a new subscription: a resubscribe after a
            # reconnect must not replay them as fresh readings.
            topics = [(s.mqtt_filter, SubscribeOptions(qos=s.qos, retainHandling=1)) for s in subs]
        else:
            topics = [(s.mqtt_filter, s.qos) for s in subs]
        granted = await client.subscribe(topics, timeout=self.cfg.connect_timeout)
        refused = [
            f"{t}: {g}" for (t, _), g in zip(topics, granted, strict=False) if _code(g) >= 0x80
        ]
        if refused:
            raise aiomqtt.MqttError("subscription refused by the broker: " + "; ".join(refused))
        log.info("mqtt_subscribed", source=self.name, filters=[t for t, _ in topics])

    # ------------------------------------------------------------------ consume

    async def _consume(self, client: aiomqtt.Client, pipe: _Pipe, out: Output) -> None:
        """Map, commit, then acknowledge the batches :meth:`_on_message` fills; until
        disconnected.

        paho's ``on_message`` callback keeps only each message's topic, payload, id and
        arrival time: no aiomqtt message object, queue entry or wake-up per message, and
        paho's heavy message (~60 objects with its MQTT 5 properties) is freed at once.
        Left queued while a commit waited, those messages were promoted through the GC
        generations and every collection walked them again (40% of the source's time at
        10k messages/s). The committer takes the oldest batch whenever the previous
        commit is done and maps it in tight loops with cyclic GC paused: mapped one by one
        between paho's reads, the same work cost about twice as much (measured with
        benchmarks/mqtt_ingest.py: 0.65 of the bare subscriber, 0.73-0.84 batched).
        """
        assert pipe.conn is not None
        committer = asyncio.create_task(self._commit_batches(pipe.conn, out, pipe))
        disconnected = pipe.conn.disconnected
        try:
            await asyncio.wait((committer, disconnected), return_when=asyncio.FIRST_COMPLETED)
            if committer.done():
                committer.result()  # an outbox error, as itself
            exc = disconnected.exception()
            raise aiomqtt.MqttError("Disconnected during message iteration") from exc
        finally:
            committer.cancel()
            await asyncio.gather(committer, return_exceptions=True)
            if disconnected.done() and not disconnected.cancelled():
                disconnected.exception()  # retrieved: no "never retrieved" noise

    def _on_message(
        self, pipe: _Pipe, topic: bytes, payload: bytes | bytearray, mid: int, qos: int
    ) -> None:
        """The adapter's message callback: keep the message's topic, payload and id in the
        open batch; at ``max_held_bytes`` stop reading. Nothing here can raise into paho,
        which would handle the same packet again and again."""
        if pipe.closed:
            return  # its session is over: not acknowledged, so the broker redelivers it
        now = time.time()
        self.counters["received"] += 1
        self.last_message_at = now
        limit = self.cfg.max_held_bytes
        if pipe.held >= limit and self._over_limit(pipe, topic, qos):
            return
        size = len(topic) + len(payload) + HELD_OVERHEAD
        raw = (topic, payload, now)
        ack = (mid, qos)
        batch = pipe.open_batch(self.cfg.batch_max_messages)
        batch.raw.append(raw)
        batch.acks.append(ack)
        batch.held += size
        pipe.held += size
        pipe.held_messages += 1
        pipe.ready.set()
        if pipe.held >= limit:
            self._pause(pipe)

    def _pause(self, pipe: _Pipe) -> None:
        """Stop reading: what is held waits for commits (is the outbox full?), and the
        broker keeps the rest queued (QoS 1 in the session; QoS 0 as the broker's queue
        limits allow) instead of this process's memory."""
        if pipe.conn is None or pipe.conn.paused:
            return  # no connection (a test's pipe), or paused already
        pipe.conn.pause()
        self.counters["read_pauses"] += 1
        log.info(
            "mqtt_reading_paused",
            source=self.name,
            held_bytes=pipe.held,
            held_messages=pipe.held_messages,
            max_held_bytes=self.cfg.max_held_bytes,
            detail="messages received and not yet committed reached max_held_bytes; the "
            "broker queues the rest until commits catch up",
        )

    def _resume(self, pipe: _Pipe) -> None:
        assert pipe.conn is not None
        since = pipe.conn.paused_since
        pipe.conn.resume()
        log.info(
            "mqtt_reading_resumed",
            source=self.name,
            held_bytes=pipe.held,
            paused_for=None if since is None else round(time.time() - since, 2),
        )

    def _over_limit(self, pipe: _Pipe, topic: bytes, qos: int) -> bool:
        """A message read while the held bytes are at ``max_held_bytes`` (reading is
        paused then, so only bytes already read: e.g. decrypted by TLS); True: drop it.

        QoS 0 has no redelivery: the message is dropped, counted and logged. A QoS 1
        message is kept: dropping one unacknowledged would stall the broker's window
        until a reconnect.
        """
        if qos == 0:
            self.counters["dropped_qos0_over_held_limit"] += 1
            n = self.counters["dropped_qos0_over_held_limit"]
            if n == 1 or n % 1000 == 0:
                log.warning(
                    "mqtt_qos0_dropped_over_held_limit",
                    source=self.name,
                    topic=topic.decode("utf-8", "replace"),
                    dropped=n,
                    held_bytes=pipe.held,
                    detail="QoS 0 messages arrived while max_held_bytes was reached and "
                    "cannot be redelivered; use QoS 1 for data that must not be lost",
                )
            return True
        self.counters["qos1_held_over_limit"] += 1
        if not pipe.over_limit_logged:
            pipe.over_limit_logged = True
            log.warning(
                "mqtt_held_over_limit",
                source=self.name,
                topic=topic.decode("utf-8", "replace"),
                held_bytes=pipe.held,
                max_held_bytes=self.cfg.max_held_bytes,
                detail="a QoS 1 message arrived while max_held_bytes was reached; it is "
                "kept (and reading stays paused)",
            )
        return False

    async def _map_batch(self, batch: _Batch) -> None:
        """Map a batch's messages in arrival order, in tight loops of ``MAP_SLICE`` messages
        with cyclic GC paused (mapped one by one between paho's reads, the same work cost
        twice as much), yielding to the event loop between slices so a large batch of
        many-metric messages never holds it for long."""
        for start in range(0, len(batch.raw), MAP_SLICE):
            if start:
                await asyncio.sleep(0)
            was_enabled = gc.isenabled()
            gc.disable()  # no await inside a slice; its records live until the commit
            try:
                for topic, payload, arrived in batch.raw[start : start + MAP_SLICE]:
                    # the arrival time, not now: a batch may wait behind a blocked commit,
                    # and a message without a timestamp of its own is observed on arrival
                    when = datetime.fromtimestamp(arrived, UTC)
                    self._map_one(batch, topic, payload, when)
            finally:
                if was_enabled:
                    gc.enable()
        batch.raw.clear()

    def _map_one(
        self, batch: _Batch, topic: bytes, payload: bytes | bytearray, now: datetime
    ) -> None:
        if not isinstance(payload, bytes):
            payload = bytes(payload)
        undo = self.mapper.rbe_undo
        mark = undo.mark() if undo is not None else (0, 0)
        try:
            outcome = self._map_message(topic, payload, now)
        except Exception as exc:  # a bug: its message is quarantined, the session goes on
            # RBE may have taken values of this message as reported before the failure;
            # none of them is stored, so none may suppress a later equal value. Only
            # this message's points go back: the others' state is right.
            if undo is not None:
                self.mapper.rbe.rollback(undo, mark)
            shown = topic.decode("utf-8", "replace")
            log.exception("mqtt_mapping_failed", source=self.name, topic=shown)
            outcome = Outcome(
                quarantine=Quarantined(
                    self.name,
                    "mapping_failed",
                    {"topic": shown, "error": f"{type(exc).__name__}: {exc}"},
                    _preview(payload),
                )
            )
        batch.records += outcome.records
        batch.suppressed += outcome.suppressed
        if outcome.quarantine is not None:
            batch.bad.append(outcome.quarantine)
        if outcome.cursor is not None:
            batch.cursor = outcome.cursor  # each holds the full alias state

    def _map_message(self, raw_topic: bytes, payload: bytes, now: datetime) -> Outcome:
        try:
            topic = raw_topic.decode("utf-8")
        except UnicodeDecodeError:
            outcome = Outcome(quarantine=self.mapper.bad_topic(raw_topic, payload))
        else:
            outcome = self.mapper.map(topic, payload, now)
        if outcome.quarantine is not None:
            self._log_bad(outcome.quarantine)
        return outcome

    async def _commit_batches(self, conn: Connection, out: Output, pipe: _Pipe) -> None:
        while True:
            # An append that returned although this task was cancelled meanwhile (a
            # cancel swallowed below it, as 3.11's wait_for does) is committed and its
            # batch acknowledged; the stop must still win before the next wait, or the
            # session's end waits for this task forever (tests/contract).
            tasks.raise_if_cancelling()
            if not pipe.batches:
                pipe.ready.clear()
                await pipe.ready.wait()
                continue
            batch = pipe.batches.popleft()
            pipe.committing = True  # from here RBE and aliases learn from the batch
            self.mapper.rbe_undo = RbeUndo()
            await self._map_batch(batch)
            if batch.records or batch.bad or batch.cursor:
                await out.append(batch.records, batch.cursor, quarantine=batch.bad)
            pipe.committing = False
            self.mapper.rbe_undo = None  # stored: what RBE learnt from it stands
            pipe.held -= batch.held
            pipe.held_messages -= len(batch.acks)
            if conn.paused and pipe.held <= self.cfg.max_held_bytes // 2:
                self._resume(pipe)
            self.counters["records"] += len(batch.records)
            self.counters["quarantined"] += len(batch.bad)
            self.counters["suppressed"] += batch.suppressed
            self.counters["committed_messages"] += len(batch.acks)
            if not self._hold_acks:
                ack = conn.ack
                for mid, qos in batch.acks:
                    ack(mid, qos)
                self.counters["acked"] += len(batch.acks)

    def _log_bad(self, q: Quarantined) -> None:
        n = self.mapper.counters[q.reason]
        if n == 1 or n % 100 == 0:
            log.warning(
                "mqtt_bad_input",
                source=self.name,
                reason=q.reason,
                topic=q.context.get("topic"),
                count=n,
                detail=q.context["problems"][0]["detail"] if q.context.get("problems") else None,
            )
