"""``edge-agent tap`` for MQTT: the next messages of a source's subscriptions, mapped.

The tap connects under its OWN client id (``<client_id>-tap-<pid>``) with a clean
session that ends with the connection: the broker's persistent session of the service
(its subscriptions and the messages queued for it) is never touched, so the tap runs
beside a running service without kicking it off, and acknowledges nothing of its queue.
It subscribes to the same filters (a new subscription gets the retained messages first,
then live ones) and maps each message with the source's own :class:`~.mapping.Mapper`.
The tap's own QoS 1 copies are acknowledged in its own session, which the broker drops
at the disconnect. Nothing is written anywhere.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.configtypes import secret_value
from agent.errors import ConfigError, TransientError
from agent.outbox import Quarantined
from agent.sources.base import SourceContext, Tapped, TapRequest
from agent.sources.mqtt.client import Connection
from agent.sources.mqtt.config import MqttConfig
from agent.sources.mqtt.mapping import Mapper, Outcome, _preview
from agent.sources.mqtt.source import MqttSource, _code, tls_context

CLIENT_ID_MAX = 128  # what the config allows for the service's id


def tap_client_id(client_id: str, pid: int | None = None) -> str:
    """The tap's client id: the service's with ``-tap-<pid>``, never the service's own."""
    suffix = f"-tap-{os.getpid() if pid is None else pid}"
    return client_id[: CLIENT_ID_MAX - len(suffix)] + suffix


def _client(config: MqttConfig, client_id: str) -> aiomqtt.Client:
    v5 = config.protocol == "5"
    props = None
    if v5:
        # Session Expiry 0 (the default): the session ends with the connection.
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.MaximumPacketSize = config.packet_limit
    return aiomqtt.Client(
        config.host,
        config.port,
        username=config.username,
        password=secret_value(config.password),
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        clean_session=None if v5 else True,
        # paho refuses clean_start with 3.1.1 unless left at its default
        clean_start=True if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        keepalive=max(1, int(config.keepalive)),
        timeout=config.connect_timeout,
        properties=props,
        tls_context=tls_context(config.tls) if config.tls is not None else None,
        tls_insecure=True if config.tls is not None and config.tls.insecure_skip_verify else None,
    )


def _map(mapper: Mapper, name: str, topic: bytes, payload: bytes, now: datetime) -> Outcome:
    """One message as the source maps it (a mapping bug is a bad input here too)."""
    try:
        text = topic.decode("utf-8")
    except UnicodeDecodeError:
        return Outcome(quarantine=mapper.bad_topic(topic, payload))
    try:
        return mapper.map(text, payload, now)
    except Exception as exc:
        context = {"topic": text, "error": f"{type(exc).__name__}: {exc}"}
        return Outcome(quarantine=Quarantined(name, "mapping_failed", context, _preview(payload)))


async def tap(
    name: str, config: MqttConfig, context: SourceContext, request: TapRequest
) -> AsyncIterator[Tapped]:
    """The records (and bad inputs) of the next ``request.limit`` messages, or of what
    came within ``request.timeout``; see the module docstring."""
    if request.entity is not None:
        raise ConfigError(
            [("--entity", "an MQTT source has no entities: its tap shows every subscription")]
        )
    mapper = Mapper(MqttSource(name, config, context).ref, config)
    client_id = tap_client_id(config.client_id)
    client = _client(config, client_id)
    messages: asyncio.Queue[tuple[bytes, bytes, int, int, float]] = asyncio.Queue()

    def on_message(topic: bytes, payload: bytes | bytearray, mid: int, qos: int) -> None:
        messages.put_nowait((topic, bytes(payload), mid, qos, time.time()))

    conn = Connection(client, on_message)
    conn.disable_paho_logger()
    where = f"broker {config.host}:{config.port}"
    try:
        async with client:
            filters: list[tuple[str, Any]] = [(s.mqtt_filter, s.qos) for s in config.subscriptions]
            granted = await client.subscribe(filters, timeout=config.connect_timeout)
            refused = [t for (t, _), g in zip(filters, granted, strict=False) if _code(g) >= 0x80]
            if refused:
                raise TransientError(f"{where} refused the subscription of {', '.join(refused)}")
            async for item in _take(mapper, name, conn, messages, request):
                yield item
    except aiomqtt.MqttError as exc:
        raise TransientError(f"cannot read from {where} as {client_id!r}: {exc}") from exc
    finally:
        await conn.aclose()


async def _take(
    mapper: Mapper,
    name: str,
    conn: Connection,
    messages: asyncio.Queue[tuple[bytes, bytes, int, int, float]],
    request: TapRequest,
) -> AsyncIterator[Tapped]:
    deadline = asyncio.get_running_loop().time() + request.timeout
    for _ in range(request.limit):
        get = asyncio.ensure_future(messages.get())
        done, _pending = await asyncio.wait(
            (get, conn.disconnected),
            timeout=max(0.0, deadline - asyncio.get_running_loop().time()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if get not in done:
            get.cancel()
            if conn.disconnected.done():
                exc = conn.disconnected.exception()
                raise aiomqtt.MqttError(f"disconnected: {exc}")
            return  # the timeout: what came is all there is
        topic, payload, mid, qos, arrived = get.result()
        outcome = _map(mapper, name, topic, payload, datetime.fromtimestamp(arrived, UTC))
        conn.ack(mid, qos)  # the tap's own session: nothing of the service's
        for record in outcome.records:
            yield record
        if outcome.quarantine is not None:
            yield outcome.quarantine
