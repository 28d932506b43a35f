"""The MQTT sink, ``upstream.type = "mqtt"``: records published with QoS 1 (docs/upstream.md).

A record is acknowledged in the outbox only after the broker's PUBACK for the message
holding it. The client keeps a fixed client id and a persistent session (MQTT 5,
``clean_start`` false, a session expiry). Each record goes to the topic its template
gives (placeholders filled from the record), one record per message or a JSON batch of
consecutive records of the same topic, split at ``max_message_bytes``.

PUBACK reason codes are sorted by ONE function, :func:`classify`. MQTT cannot say that
a message is a duplicate and has no retry-after: a record sent again is accepted again
(at-least-once; consumers dedupe by record ``id``). A lost connection, or one that
cannot be made, is a transient failure: the forwarder's backoff paces the reconnects,
one connect attempt per send.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import ssl
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import aiomqtt
import orjson
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import Field, SecretStr, field_validator, model_validator

from agent.configtypes import ByteSize, ExistingFile, PositiveDuration, SecretFilePath
from agent.configtypes import warn as config_warn
from agent.errors import BatchRejected, BatchTooLarge, ReauthorizationRequired, TransientError
from agent.health import State
from agent.outbox import Leased
from agent.sinks.base import Rejection, SendResult, Sink, SinkPlugin, UpstreamConfig
from agent.sources.base import UniqueKey
from agent.sources.mqtt.client import Acks

PLACEHOLDERS = frozenset(
    {
        "site",
        "agent_id",
        "client_id",
        "entity_type",
        "source",
        "system",
        "asset",
        "remote_id",
        "entity_id",
        "id",
    }
)
"""What a topic template may name (docs/upstream.md)."""

MISSING = "_"
"""The topic level of a placeholder the record has no value for."""

AWS_MAX_MESSAGE = 128 << 10
AZURE_MAX_MESSAGE = 256 << 10
AZURE_API = "2021-04-12"
AZURE_TOPIC = "devices/{client_id}/messages/events/$.ct=application%2Fjson&$.ce=utf-8"
TB_CONNECT = "v1/gateway/connect"
TB_TELEMETRY = "v1/gateway/telemetry"
TB_ATTRIBUTES = "v1/gateway/attributes"
READINGS = frozenset({"meter_reading", "event"})

_UNSAFE = re.compile(r"[+#/\x00]")
_AUTH_CODES = frozenset({0x04, 0x05, 0x86, 0x87, 0x8C})
"""CONNACK codes that mean the credentials are refused (MQTT 3.1.1: 4, 5; MQTT 5)."""


class MqttSinkConfig(UpstreamConfig):
    """``[upstream]`` with ``type = "mqtt"``: publish records to an MQTT broker (QoS 1)."""

    type: Literal["mqtt"] = "mqtt"
    """``mqtt``: publish to a broker, acknowledged after each message's PUBACK."""
    preset: Literal["thingsboard", "aws_iot", "azure_iot"] | None = None
    """A platform's conventions (docs/upstream.md "MQTT presets"): ``thingsboard`` (the
    gateway API: v1/gateway/connect, telemetry, attributes), ``aws_iot`` (128 KiB, a topic
    per thing) or ``azure_iot`` (IoT Hub: devices/{client_id}/messages/events/, MQTT 3.1.1,
    SAS token as password)."""
    protocol: Literal["5", "3.1.1"] = "5"
    """MQTT version. 3.1.1 has no PUBACK reason codes (every PUBACK accepts) and no
    session expiry (the session lasts until the broker drops it). ``azure_iot``: 3.1.1."""
    host: str = Field(min_length=1)
    """Broker host name or address."""
    port: int | None = Field(default=None, gt=0, lt=65536)
    """Broker port; default 8883 with TLS, 1883 without."""
    client_id: str = Field(min_length=1, max_length=128)
    """Fixed client id of the agent's session; unique on the broker (check-config refuses
    one equal to an MQTT source's on the same broker)."""
    username: str | None = None
    """User name, if the broker asks for one."""
    password: SecretStr | None = None
    """Password. Prefer ``password_file``."""
    password_file: SecretFilePath | None = None
    """File holding the password (mode 600). Re-read on reload (SIGHUP)."""
    tls: bool = True
    """Connect with TLS (on by default)."""
    tls_verify: bool = True
    """Verify the broker's certificate and host name. Only turn off for a lab."""
    ca_file: ExistingFile | None = None
    """CA bundle (PEM) that signed the broker's certificate. Default: the system store."""
    client_cert_file: ExistingFile | None = None
    """Client certificate (PEM) for mutual TLS."""
    client_key_file: ExistingFile | None = None
    """Key of ``client_cert_file`` when it is not in the same file."""
    topic: str = "edge/{site}/{entity_type}"
    """Topic template (fixed by the ``thingsboard`` and ``azure_iot`` presets;
    ``aws_iot``'s default is ``edge/{client_id}/{entity_type}``). Placeholders:
    ``{site}``, ``{agent_id}``, ``{client_id}``, ``{entity_type}``, ``{source}``,
    ``{system}``, ``{asset}`` (the record's asset remote id: its own for an asset),
    ``{remote_id}``, ``{entity_id}``, ``{id}``. A value's ``/``, ``+`` and ``#`` become
    ``_``, and so does a value the record lacks."""
    payload: Literal["record", "batch"] = "record"
    """``record``: one envelope per message; ``batch``: ``{"agent_id", "batch_id",
    "records": [...]}`` of consecutive records with the same topic."""
    device: str = "{asset}"
    """``thingsboard``: the ThingsBoard device a record belongs to (same placeholders as
    ``topic``); a record without a value for it goes to the device named by its source."""
    max_message_bytes: ByteSize = 256 << 10
    """Largest message payload. A batch is split to fit; a record that does not fit alone
    is refused (dead letter, reason ``too_large``)."""
    session_expiry: PositiveDuration = 7 * 86400.0
    """How long the broker keeps the session while the agent is away (MQTT 5)."""
    keepalive: int = Field(default=60, ge=5, le=65535)
    """Seconds between keepalive pings."""
    max_inflight: int = Field(default=100, ge=1, le=65535)
    """Messages awaiting their PUBACK at once."""
    connect_timeout: PositiveDuration = 10.0
    """Time allowed to connect (TCP, TLS and CONNACK)."""
    ack_timeout: PositiveDuration = 60.0
    """Time allowed for the PUBACKs of one batch; then the rest is sent again."""

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        preset, given = data["preset"], dict(data)
        if preset in ("thingsboard", "azure_iot") and "topic" in given:
            raise ValueError(f"preset {preset!r} fixes the topic: leave 'topic' out")
        if preset == "thingsboard":
            given.setdefault("payload", "batch")
        elif preset == "aws_iot":
            given.setdefault("topic", "edge/{client_id}/{entity_type}")
            given.setdefault("max_message_bytes", AWS_MAX_MESSAGE)
            given.setdefault("max_inflight", 100)
        elif preset == "azure_iot":
            given["topic"] = AZURE_TOPIC
            given.setdefault("protocol", "3.1.1")
            if "host" in given and "client_id" in given:
                given.setdefault(
                    "username", f"{given['host']}/{given['client_id']}/?api-version={AZURE_API}"
                )
        return given

    @model_validator(mode="after")
    def _check_preset(self) -> MqttSinkConfig:
        if self.preset == "thingsboard" and self.payload != "batch":
            raise ValueError("preset 'thingsboard' sends gateway API batches: payload = 'batch'")
        if self.preset == "aws_iot":
            if self.max_message_bytes > AWS_MAX_MESSAGE:
                raise ValueError("AWS IoT Core takes messages of at most 128KiB: max_message_bytes")
            if self.max_inflight > 100:
                raise ValueError("AWS IoT Core allows 100 unacknowledged messages: max_inflight")
            if not self.tls or self.client_cert_file is None:
                config_warn("preset aws_iot: AWS IoT Core wants TLS with a client certificate")
        if self.preset == "azure_iot":
            if self.protocol != "3.1.1":
                raise ValueError("Azure IoT Hub speaks MQTT 3.1.1: protocol = '3.1.1'")
            if self.max_message_bytes > AZURE_MAX_MESSAGE:
                raise ValueError("Azure IoT Hub takes messages of at most 256KiB")
            if self.password is None:
                raise ValueError("preset azure_iot needs the SAS token: password_file")
        return self

    def target(self) -> str:
        """``mqtt://host:port`` and the topic template."""
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.host}:{self.broker_port} {self.topic}"

    @property
    def broker_port(self) -> int:
        """The configured port, or the default for ``tls``."""
        return self.port or (8883 if self.tls else 1883)

    def unique_keys(self) -> dict[str, UniqueKey]:
        """One client id per broker: an MQTT source with the same one would take the
        session over."""
        return {
            "client_id": UniqueKey(
                ("mqtt", self.host.lower(), self.broker_port, self.client_id),
                f"{self.client_id!r} on broker {self.host}:{self.broker_port}",
                "the broker disconnects one client whenever the other connects, forever",
            )
        }

    @field_validator("topic", "device")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        try:
            parts = list(string.Formatter().parse(value))
        except ValueError as exc:
            raise ValueError(f"invalid topic template {value!r}: {exc}") from None
        names = {name for _, name, _, _ in parts if name is not None}
        unknown = sorted(n for n in names if n not in PLACEHOLDERS)
        if unknown or "" in names:
            known = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
            raise ValueError(f"unknown placeholder {unknown or ['{}']} (known: {known})")
        if any(spec or conv for _, name, spec, conv in parts if name):
            raise ValueError("placeholders take no format spec or conversion")
        literal = "".join(text for text, _, _, _ in parts)
        if not value or "+" in literal or "#" in literal or value.startswith("$"):
            raise ValueError("a topic is not empty, has no + or #, and does not start with $")
        return value

    @field_validator("max_message_bytes")
    @classmethod
    def _check_size(cls, value: int) -> int:
        if value < 1024:
            raise ValueError("must be at least 1KiB")
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> MqttSinkConfig:
        try:
            tls_context(self)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cannot load the TLS files (ca_file, client_cert_file): {exc}"
            ) from None
        if self.tls and not self.tls_verify:
            config_warn("upstream.tls_verify is off: the broker's identity is not checked")
        if not self.tls:
            config_warn("upstream.tls is off: records and the password travel in clear")
        return self


def tls_context(config: MqttSinkConfig) -> ssl.SSLContext | None:
    """TLS settings: verification on by default, extra CA, client certificate."""
    if not config.tls:
        return None
    ctx = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
    if not config.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if config.client_cert_file is not None:
        key = str(config.client_key_file) if config.client_key_file else None
        ctx.load_cert_chain(str(config.client_cert_file), key)
    return ctx


class Action(enum.Enum):
    """What a PUBACK reason code means for the records of its message."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    TOO_LARGE = "too_large"
    RETRY = "retry"


_REJECTED = {
    0x83: "implementation_specific_error",
    0x87: "not_authorized",
    0x90: "topic_name_invalid",
    0x99: "payload_format_invalid",
}


def classify(code: int) -> tuple[Action, str]:
    """Sort one PUBACK reason code: THE retry classification of the MQTT sink.

    0 and 0x10 (no matching subscribers: the broker has the message) are accepted; a
    refusal of this message (not authorized for its topic, invalid topic or payload,
    implementation-specific) rejects its records; 0x95 says it is too large; anything
    else (quota exceeded, unspecified error) is retried.
    """
    if code in (0x00, 0x10):
        return Action.ACCEPTED, "success"
    if code == 0x95:
        return Action.TOO_LARGE, "packet_too_large"
    if code in _REJECTED:
        return Action.REJECTED, _REJECTED[code]
    return Action.RETRY, {0x97: "quota_exceeded", 0x80: "unspecified_error"}.get(
        code, f"reason_{code:#04x}"
    )


def _level(value: Any) -> str:
    text = "" if value is None else str(value)
    return _UNSAFE.sub("_", text) or MISSING


def topic_of(template: str, agent_id: str, record: dict[str, Any], client_id: str = MISSING) -> str:
    """The topic of one record (an envelope as parsed JSON)."""
    source = record.get("source") or {}
    data = record.get("data") or {}
    asset = record.get("remote_id") if record.get("entity_type") == "asset" else None
    values = {
        "site": source.get("site"),
        "agent_id": agent_id,
        "client_id": client_id,
        "entity_type": record.get("entity_type"),
        "source": source.get("name"),
        "system": source.get("system"),
        "asset": asset or data.get("asset_remote_id"),
        "remote_id": record.get("remote_id"),
        "entity_id": record.get("entity_id"),
        "id": record.get("id"),
    }
    return template.format_map({k: _level(v) for k, v in values.items()})


@dataclass(slots=True)
class Message:
    """One message to publish and the records it holds."""

    topic: str
    payload: bytes
    items: list[Leased] = field(default_factory=list)


def _batch_payload(agent_id: str, batch_id: str, bodies: Sequence[bytes]) -> bytes:
    head = b'{"agent_id":' + orjson.dumps(agent_id) + b',"batch_id":' + orjson.dumps(batch_id)
    return head + b',"records":[' + b",".join(bodies) + b"]}"


def plan(
    config: MqttSinkConfig,
    agent_id: str,
    batch: Sequence[Leased],
    batch_id: str,
    limit: int | None = None,
) -> tuple[list[Message], list[Rejection]]:
    """The messages of ``batch``, in order, and the records too large to send alone;
    ``limit`` is the payload limit (default ``max_message_bytes``)."""
    limit = config.max_message_bytes if limit is None else limit
    if config.preset == "thingsboard":
        return plan_thingsboard(config, agent_id, batch, limit)
    messages: list[Message] = []
    too_large: list[Rejection] = []
    group: list[Leased] = []
    group_topic = ""
    group_size = 0
    overhead = len(_batch_payload(agent_id, f"{batch_id}:000000", []))

    def flush() -> None:
        nonlocal group, group_size
        if group:
            mid = f"{batch_id}:{len(messages)}"
            body = _batch_payload(agent_id, mid, [item.body for item in group])
            messages.append(Message(group_topic, body, group))
        group, group_size = [], 0

    for item in batch:
        topic = topic_of(config.topic, agent_id, orjson.loads(item.body), config.client_id)
        size = len(item.body) if config.payload == "record" else overhead + len(item.body)
        if size > limit:
            too_large.append(
                Rejection(item.id, "too_large", f"{size} bytes, over max_message_bytes {limit}")
            )
            continue
        if config.payload == "record":
            messages.append(Message(topic, item.body, [item]))
            continue
        if group and (topic != group_topic or group_size + 1 + len(item.body) > limit):
            flush()
        if not group:
            group_topic, group_size = topic, overhead
        group.append(item)
        group_size += len(item.body) + (1 if len(group) > 1 else 0)
    flush()
    return messages, too_large


def _ms(stamp: Any) -> int | None:
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return int(when.timestamp() * 1000)


def thingsboard_entry(
    config: MqttSinkConfig, agent_id: str, record: dict[str, Any]
) -> tuple[str, str, Any]:
    """``(topic, device, entry)`` of one record in ThingsBoard's gateway API.

    Readings and events are telemetry, ``{"ts": ms, "values": {point: value}}`` (an
    event's fields as ``point.field``); every other entity is client-side attributes of
    its device: an asset's data itself, another entity under ``<entity_type>:<remote_id>``.
    Each carries its record id (``edge_id``), so a consumer can dedupe.
    """
    device = topic_of(config.device, agent_id, record, config.client_id)
    if device == MISSING:
        device = _level((record.get("source") or {}).get("name"))
    data = record.get("data") or {}
    kind = record.get("entity_type")
    if kind in READINGS:
        point = str(data.get("point") or record.get("remote_id") or "value")
        skip = {"point", "asset_remote_id"}
        if kind == "meter_reading" and "value" in data:
            values: dict[str, Any] = {point: data["value"]}
        else:
            values = {f"{point}.{k}": v for k, v in data.items() if k not in skip}
        entry: dict[str, Any] = {"values": values}
        ts = _ms(record.get("observed_at"))
        if ts is not None:
            entry["ts"] = ts
        return TB_TELEMETRY, device, entry
    attrs = {"edge_id": record.get("id"), "op": record.get("op")}
    if kind == "asset":
        return TB_ATTRIBUTES, device, {**data, **attrs}
    return TB_ATTRIBUTES, device, {f"{kind}:{record.get('remote_id')}": {**data, **attrs}}


def plan_thingsboard(
    config: MqttSinkConfig, agent_id: str, batch: Sequence[Leased], limit: int
) -> tuple[list[Message], list[Rejection]]:
    """Gateway API messages: a ``v1/gateway/connect`` for each device of the batch, then
    telemetry (``{device: [entries]}``) and attributes (``{device: {...}}``) messages of
    consecutive records of the same kind, split at ``limit``."""
    messages: list[Message] = []
    too_large: list[Rejection] = []
    devices: dict[str, str] = {}
    group: dict[str, Any] = {}
    items: list[Leased] = []
    topic = ""
    size = 0  # at least the group's JSON size: the records' alone sizes added up

    def flush() -> None:
        nonlocal group, items, size
        if items:
            messages.append(Message(topic, orjson.dumps(group), items))
        group, items, size = {}, [], 0

    for item in batch:
        record = orjson.loads(item.body)
        kind, device, entry = thingsboard_entry(config, agent_id, record)
        devices.setdefault(device, str(record.get("entity_type") or "default"))
        alone = orjson.dumps({device: [entry] if kind == TB_TELEMETRY else entry})
        if len(alone) > limit:
            too_large.append(Rejection(item.id, "too_large", f"{len(alone)} bytes, over {limit}"))
            continue
        if items and (kind != topic or size + len(alone) > limit):
            flush()
        topic = kind
        size += len(alone)
        if kind == TB_TELEMETRY:
            group.setdefault(device, []).append(entry)
        else:
            group.setdefault(device, {}).update(entry)
        items.append(item)
    flush()
    connects = [
        Message(TB_CONNECT, orjson.dumps({"device": d, "type": t}), []) for d, t in devices.items()
    ]
    return connects + messages, too_large


def _properties() -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.PayloadFormatIndicator = 1
    props.ContentType = "application/json"
    return props


def _disconnect_code(exc: BaseException | None) -> int | None:
    rc = getattr(exc, "rc", None)
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else None


class MqttSink(Sink):
    """Publishes records over one MQTT 5 connection (see the module docstring)."""

    type = "mqtt"
    config: MqttSinkConfig

    def __init__(self, config: UpstreamConfig, agent_id: str) -> None:
        assert isinstance(config, MqttSinkConfig)
        super().__init__(config, agent_id)
        self._client: aiomqtt.Client | None = None
        self._acks: Acks | None = None
        self._connecting = asyncio.Lock()
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()
        self.connects = 0
        self.disconnects = 0
        self.messages = 0
        self.reason_codes: dict[str, int] = {}
        """PUBACKs by reason (``success``, ``not_authorized``...)."""
        self.wire_bytes = 0
        self.session_present: bool | None = None

    def describe(self) -> str:
        """The broker and topic template."""
        return self.config.target()

    def status(self) -> dict[str, Any]:
        """Broker, client id, connects and PUBACKs by reason."""
        return {
            "broker": f"{self.config.host}:{self.config.broker_port}",
            "client_id": self.config.client_id,
            "connected": self._connected(),
            "connects": self.connects,
            "disconnects": self.disconnects,
            "messages": self.messages,
            "pubacks": dict(self.reason_codes),
            "wire_bytes": self.wire_bytes,
        }

    def reconfigure(self, config: UpstreamConfig, agent_id: str) -> None:
        """A reloaded config: the next send connects with it when the connection changes."""
        assert isinstance(config, MqttSinkConfig)
        old, self.config, self.agent_id = self.config, config, agent_id
        if _connection_settings(old) != _connection_settings(config):
            self._drop()

    def _connected(self) -> bool:
        acks = self._acks
        return acks is not None and not acks.disconnected.done()

    def _drop(self) -> None:
        """Forget the connection; it is closed in the background."""
        client, self._client, self._acks = self._client, None, None
        if client is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a reconfigure outside the daemon): nothing runs
                return
            task = loop.create_task(_quietly_close(client))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _connect(self) -> Acks:
        async with self._connecting:
            if self._closed:
                raise TransientError("the sink is closed")
            if self._acks is not None and not self._acks.disconnected.done():
                return self._acks
            if self._acks is not None:
                self.disconnects += 1
                self._drop()
            cfg = self.config
            v5 = cfg.protocol == "5"
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = min(int(cfg.session_expiry), 0xFFFFFFFF)
            client = aiomqtt.Client(
                cfg.host,
                cfg.broker_port,
                identifier=cfg.client_id,
                username=cfg.username,
                password=cfg.password.get_secret_value() if cfg.password else None,
                protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
                # 3.1.1 has clean_session instead; paho refuses any other clean_start
                clean_start=False if v5 else MQTT_CLEAN_START_FIRST_ONLY,
                clean_session=None if v5 else False,
                properties=props if v5 else None,
                keepalive=cfg.keepalive,
                max_inflight_messages=cfg.max_inflight,
                timeout=cfg.connect_timeout,
                tls_context=tls_context(cfg),
            )
            acks = Acks(client)
            try:
                await asyncio.wait_for(client.__aenter__(), cfg.connect_timeout)
            except MqttConnectError as exc:
                code = _disconnect_code(exc)
                if code in _AUTH_CODES:
                    self.tracker.set(State.REAUTH, f"broker refused the credentials: {exc}")
                    raise ReauthorizationRequired(
                        f"broker refused the connection: {exc}",
                        reason="unauthorized" if code in (0x04, 0x86, 0x8C) else "forbidden",
                        request_id=cfg.client_id,
                    ) from None
                self._failed(f"connect refused: {exc}")
                raise TransientError(
                    f"connect refused: {exc}", status=code, request_id=cfg.client_id
                ) from None
            except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # aiomqtt's connect turns a cancel into a timeout: be cancelled
                    raise asyncio.CancelledError from None
                detail = str(exc) or type(exc).__name__
                self._failed(f"connect_error: {detail}")
                raise TransientError(f"connect_error: {detail}", request_id=cfg.client_id) from None
            self._client, self._acks = client, acks
            self.connects += 1
            self.tracker.set(State.OK, f"connected to {cfg.host}:{cfg.broker_port}")
            acks.disconnected.add_done_callback(lambda done: self._lost(acks, done))
            return acks

    def _lost(self, acks: Acks, done: asyncio.Future[None]) -> None:
        """The connection ended: health says so at once, not at the next send."""
        error = None if done.cancelled() else done.exception()
        if acks is self._acks and not self._closed:
            self._failed(f"connection lost: {error or 'closed by the broker'}")

    async def open(self) -> None:
        """Connect now if the broker can be reached; if not, the first send retries."""
        with contextlib.suppress(TransientError, ReauthorizationRequired):
            await self._connect()

    def _failed(self, reason: str) -> None:
        self.tracker.set(State.RETRYING, reason)

    async def close(self) -> None:
        """Close the connection; a send awaiting PUBACKs ends with a TransientError."""
        self._closed = True
        acks, client = self._acks, self._client
        self._client, self._acks = None, None
        if acks is not None:
            acks.fail_all(TransientError("the sink was closed", request_id=self.config.client_id))
        if client is not None:
            await _quietly_close(client)
        await asyncio.gather(*self._closing, return_exceptions=True)
        self.tracker.set(State.STOPPED, "closed")

    async def send(self, batch: Sequence[Leased], *, batch_id: str) -> SendResult:
        """Publish ``batch`` once; report each record by its message's PUBACK."""
        acks = await self._connect()
        messages, too_large = plan(
            self.config, self.agent_id, batch, batch_id, self._payload_limit(acks)
        )
        result = SendResult(rejected=too_large, request_id=f"{self.config.client_id}/{batch_id}")
        if not messages:
            return result
        futures: list[asyncio.Future[int]] = []
        try:
            for message in messages:
                props = _properties() if self.config.protocol == "5" else None
                futures.append(acks.publish(message.topic, message.payload, props))
                self.wire_bytes += len(message.payload)
                result.wire_bytes += len(message.payload)
        except aiomqtt.MqttError as exc:
            for future in futures:
                future.cancel()
            self._failed(f"publish failed: {exc}")
            raise TransientError(f"publish failed: {exc}", request_id=result.request_id) from None
        self.messages += len(messages)
        await self._await_acks(futures, acks)
        return self._settle(messages, futures, result)

    def _payload_limit(self, acks: Acks) -> int:
        """``max_message_bytes``, lowered to what the broker's Maximum Packet Size leaves
        for a payload (a broker drops a client whose packet is larger)."""
        limit = self.config.max_message_bytes
        if acks.max_packet is not None:
            # fixed header 5, topic length 2 + topic, packet id 2, properties (format
            # indicator, content type) < 32
            topic = len(self.config.topic.encode()) + 256  # a filled-in template, generously
            limit = min(limit, acks.max_packet - topic - 41)
        return max(limit, 1)

    async def _await_acks(self, futures: list[asyncio.Future[int]], acks: Acks) -> None:
        """Until every PUBACK came, the connection ended, or ``ack_timeout`` passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.ack_timeout
        waiting: set[asyncio.Future[Any]] = set(futures)
        try:
            while waiting and not acks.disconnected.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                _, waiting = await asyncio.wait(
                    waiting | {acks.disconnected},
                    timeout=remaining,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                waiting.discard(acks.disconnected)
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()  # its PUBACK, if it comes, is ignored

    def _settle(
        self, messages: list[Message], futures: list[asyncio.Future[int]], result: SendResult
    ) -> SendResult:
        acked = 0
        error: BaseException | None = None
        too_large_batch = None
        refused_batch = None
        for message, future in zip(messages, futures, strict=True):
            if not future.done() or future.cancelled():
                continue
            if future.exception() is not None:
                error = future.exception()
                continue
            code = future.result()
            action, reason = classify(code)
            self.reason_codes[reason] = self.reason_codes.get(reason, 0) + 1
            ids = [item.id for item in message.items]
            if not ids:  # a message of the protocol's own (ThingsBoard's connect)
                acked += 1
                continue
            if action is Action.ACCEPTED:
                acked += 1
                result.accepted += ids
            elif action is Action.RETRY:
                result.status = code
            elif len(ids) > 1:
                if action is Action.TOO_LARGE:
                    too_large_batch = (code, reason)
                else:
                    refused_batch = (code, reason)
            else:
                text = f"broker refused the message (reason code {code:#04x} {reason})"
                if action is Action.TOO_LARGE:
                    text += f" on topic {message.topic}"
                result.rejected.append(Rejection(ids[0], reason, text))
        if too_large_batch is not None:
            code, reason = too_large_batch
            raise BatchTooLarge(
                f"broker: {reason} ({code:#04x})", status=code, request_id=result.request_id
            )
        if refused_batch is not None:
            code, reason = refused_batch
            raise BatchRejected(
                f"broker: {reason} ({code:#04x})",
                status=code,
                code=reason,
                request_id=result.request_id,
            )
        if acked < len(messages):
            return self._incomplete(messages, acked, error, result)
        result.status = 0
        return result

    def _incomplete(
        self, messages: list[Message], acked: int, error: BaseException | None, result: SendResult
    ) -> SendResult:
        """Some messages got no PUBACK: the connection ended or the wait timed out."""
        if isinstance(error, TransientError):
            raise error
        acks = self._acks
        lost = acks is None or acks.disconnected.done()
        if lost:
            exc = None if acks is None else acks.disconnected.exception()
            code = _disconnect_code(exc)
            reason = f"connection lost: {exc or 'closed'}"
            self._failed(reason)
            self._drop()
        else:
            code, reason = result.status if result.status else None, "PUBACK not received in time"
            if code:
                reason = f"broker asked to retry (reason code {code:#04x})"
        if result.accepted or result.rejected:
            result.status = code or 0
            return result  # the named ones settle; the rest is sent again after backoff
        raise TransientError(
            f"{reason} ({len(messages) - acked} of {len(messages)} messages unacknowledged)",
            status=code,
            request_id=result.request_id,
        )


def _connection_settings(config: MqttSinkConfig) -> tuple[Any, ...]:
    return (
        config.host,
        config.broker_port,
        config.client_id,
        config.username,
        config.password.get_secret_value() if config.password else None,
        config.tls,
        config.tls_verify,
        config.ca_file,
        config.client_cert_file,
        config.client_key_file,
        config.keepalive,
        config.session_expiry,
        config.max_inflight,
    )


async def _quietly_close(client: aiomqtt.Client) -> None:
    """Leave the connection (DISCONNECT when it is still up), whatever state it is in."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.__aexit__(None, None, None), 2.0)


plugin = SinkPlugin("mqtt", MqttSinkConfig, MqttSink)
