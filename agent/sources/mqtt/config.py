"""Configuration of the MQTT source: one ``[sources.<name>]`` table per broker connection.

The docstrings of these classes are the user documentation (see also docs/mqtt.md).
"""

from __future__ import annotations

import re
import ssl
import string
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from agent import profiles
from agent.codes import Code, Severity
from agent.configtypes import (
    ByteSize,
    ExistingFile,
    PositiveDuration,
    SecretFilePath,
    Section,
    at_least,
    warn,
)
from agent.rbe import ReportByException
from agent.sources.base import SourceConfig, UniqueKey

_NAMED = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")

# Names a template may use besides the subscription's named topic segments.
BUILTIN_FIELDS = frozenset({"topic", "point", "source"})
SPARKPLUG_FIELDS = frozenset({"group", "edge_node", "device", "message_type"})
# MQTT 5 packet sizes: the largest the protocol can encode (remaining length 268,435,455
# plus the fixed header), and room beside a payload for the topic and properties.
MQTT_MAX_PACKET = 268_435_460
PACKET_HEADROOM = 64 * 1024


def template_fields(template: str) -> set[str]:
    """The ``{name}`` placeholders of a template (``{{`` escapes a brace)."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


class TlsConfig(Section):
    """TLS to the broker (``[sources.<name>.tls]``). Present means TLS is on."""

    ca_file: ExistingFile | None = None
    """CA bundle (PEM) that signed the broker's certificate. Default: the system store."""
    cert_file: ExistingFile | None = None
    """Client certificate (PEM) for mutual TLS."""
    key_file: ExistingFile | None = None
    """Key of ``cert_file`` when it is not in the same file."""
    insecure_skip_verify: bool = False
    """Skip certificate and host name checks. Lab use only: never in production."""

    @model_validator(mode="after")
    def _check_files(self) -> TlsConfig:
        # Load them now, so check-config and a reload refuse a missing or bad file
        # instead of the source failing (and retrying forever) at its first connect.
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            if self.cert_file is not None:
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file or "") or None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the TLS files (ca_file, cert_file): {exc}") from None
        if self.insecure_skip_verify:
            warn("an MQTT tls.insecure_skip_verify is on: the broker's identity is not checked")
        return self


class PointConfig(Section):
    """One value taken from a message (``[[sources.<name>.subscriptions.points]]``)."""

    name: str
    """Point name (for example ``load``); also the Sparkplug metric name to pick."""
    path: str | None = None
    """Where the value is in a JSON payload: dotted (``data.load.kg``, ``items.0.v``) or a
    JSON Pointer (``/data/load/kg``). Empty: the whole payload (``format = "value"``)."""
    type: Literal["float", "int", "bool", "string", "auto"] = "auto"
    """Value type. A value that cannot be converted is bad input (quarantined)."""
    unit: str | None = None
    """Engineering unit stamped on the record (``kWh``, ``degC``)."""
    scale: float = 1.0
    """Numeric values are reported as ``value * scale + offset``."""
    offset: float = 0.0
    """See ``scale``."""
    optional: bool = False
    """A missing path is normal (skipped, counted) instead of bad input."""
    quality_path: str | None = None
    """Where the value's quality (``good``/``bad``/...) is; a change of quality always
    passes report-by-exception."""
    entity: Literal["meter_reading", "event"] | None = None
    """Record type of this point; default: the subscription's ``entity``."""
    event_field: Literal["state", "code"] = "state"
    """For ``entity = "event"``: the value is reported as the event's ``state`` or
    ``code``."""
    codes: dict[str, Code] = Field(default_factory=dict)
    """For events: raw value (as text, e.g. ``"17"``, ``"E42"``) to normalized code, text
    and severity; the raw value is kept as ``raw_code``."""
    unknown_severity: Severity = "warning"
    """Severity of a value missing from ``codes`` (its code reads ``unknown_<raw>``)."""
    rbe: ReportByException | None = None
    """Report-by-exception for this point; default: the subscription's ``rbe``."""


class TagScanConfig(Section):
    """Where the fields of a tag scan payload are (``tag_scan = {...}``)."""

    tag_path: str = "tag"
    """The tag id (EPC, BLE beacon id, QR text). Required in every scan."""
    reader_path: str | None = "reader"
    """The reader id (optional in the payload)."""
    asset_path: str | None = "asset"
    """The asset id when the reader resolves it (optional in the payload)."""
    location_path: str | None = "location"
    """The location id when the payload has one (optional)."""
    technology: Literal["rfid", "ble", "qr", "nfc", "other"] = "rfid"
    """What kind of reader this is (stamped on the event)."""
    technology_path: str | None = None
    """Where the payload says the technology, when readers of several kinds share a topic."""
    rssi_path: str | None = "rssi"
    """Signal strength (optional)."""
    assets: dict[str, str] = Field(default_factory=dict)
    """Tag id to asset remote id, for tags the payload does not resolve."""
    asset_from_tag: bool = False
    """The tag id is the asset remote id (QR codes printed with it): used when neither the
    payload nor ``assets`` resolves the tag."""
    locations: dict[str, str] = Field(default_factory=dict)
    """Reader id to location remote id, for fixed readers."""


class SubscriptionConfig(Section):
    """A topic filter and how its messages become records."""

    topic: str
    """Topic filter. ``+`` and ``#`` wildcards, and named segments: ``{asset}`` matches one
    level like ``+`` and makes that level available to templates
    (``site/{site}/lift/{asset}/+``)."""
    qos: Literal[0, 1] = 1
    """1 (default): no loss, acknowledged after commit. 0: the broker may drop messages.
    QoS 2 is refused: its acknowledgement cannot be delayed until commit."""
    format: Literal["json", "value", "sparkplug_b", "tag_scan", "inspection"] = "json"
    """Payload format: JSON with ``points`` paths, a plain number or text (``value``),
    Sparkplug B protobuf (``sparkplug_b``), an asset tag scan of an RFID/BLE/QR reader
    (``tag_scan``, see ``tag_scan``) or an inspection checklist result (``inspection``);
    docs/mqtt.md describes the last two payloads."""
    profile: str | None = None
    """Equipment profile supplying the points (docs/profiles.md); this subscription's
    ``points`` override the profile's by name and add to them."""
    tag_scan: TagScanConfig | None = None
    """For ``format = "tag_scan"``: where the scan's fields are (defaults suit
    ``{"tag": ..., "reader": ..., "at": ...}``)."""
    entity: Literal["meter_reading", "event"] = "meter_reading"
    """Record type produced for each point."""
    points: list[PointConfig] = Field(default_factory=list)
    """Values to take. Required for ``json``; for ``value`` one point without ``path``
    (default: a point named after the last topic level); for ``sparkplug_b`` a filter
    by metric name (empty: every metric, named as in the BIRTH)."""
    asset: str | None = None
    """Asset remote id template, e.g. ``"{asset}"`` or ``"lift-{asset}"``. Sparkplug
    default: ``"{edge_node}/{device}"``."""
    site: str | None = None
    """Site template (default: the source's ``site``)."""
    location: str | None = None
    """Location remote id template for ``tag_scan`` and ``inspection`` records (e.g.
    ``"{site}/{reader}"``), used when the payload has none."""
    point_id: str | None = None
    """Template of a point's unique id (the ``remote_id`` and part of the record id).
    Default: ``"{asset}/{point}"`` with an asset, else ``"{topic}/{point}"``."""
    timestamp_path: str | None = None
    """Where the observation time is in a JSON payload (dotted or JSON Pointer). Without
    it, or when absent from a message, the receive time is used. Note: a broker redelivery
    gets the same record id only when the time comes from the payload."""
    timestamp_format: Literal["auto", "s", "ms", "rfc3339"] = "auto"
    """``auto``: numbers are epoch seconds (or milliseconds when > 1e11), text is RFC 3339."""
    rbe: ReportByException | None = None
    """Default report-by-exception settings of this subscription's points."""

    @property
    def names(self) -> list[str]:
        """The named topic segments, in order."""
        return [m.group(1) for level in self.topic.split("/") if (m := _NAMED.match(level))]

    @property
    def mqtt_filter(self) -> str:
        """The filter sent to the broker (named segments become ``+``)."""
        return "/".join("+" if _NAMED.match(lvl) else lvl for lvl in self.topic.split("/"))

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        levels = value.split("/")
        if not value or "\0" in value:
            raise ValueError("topic filter must not be empty")
        for i, level in enumerate(levels):
            if level == "#" and i != len(levels) - 1:
                raise ValueError("'#' must be the last level of a topic filter")
            if ("#" in level or "+" in level) and level not in {"#", "+"}:
                raise ValueError(f"wildcard must fill a whole level: {level!r}")
            if ("{" in level or "}" in level) and not _NAMED.match(level):
                raise ValueError(f"named segment must fill a whole level: {level!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, data: Any) -> Any:
        # Before validation, so the model is built once, complete (never written into
        # afterwards). A profile name that does not resolve is the field validator's.
        if not isinstance(data, dict):
            return data
        if data.get("format") == "tag_scan" and data.get("tag_scan") is None:
            data = {**data, "tag_scan": {}}
        if isinstance(data.get("profile"), str):
            try:
                base = profile_points(data["profile"])
            except profiles.ProfileError:
                return data
            data = {**data, "points": profiles.merge(base, list(data.get("points") or []))}
        return data

    @field_validator("profile")
    @classmethod
    def _check_profile(cls, value: str | None) -> str | None:
        if value is not None:
            profile_points(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> SubscriptionConfig:
        if self.format in {"tag_scan", "inspection"} and self.points:
            raise ValueError(f"format {self.format!r} takes no 'points'")
        names = self.names
        if len(set(names)) != len(names):
            raise ValueError("a named topic segment appears twice")
        known = set(names) | BUILTIN_FIELDS | {"asset"}
        if self.format == "tag_scan":
            known |= {"reader", "location"}
        if self.format == "sparkplug_b":
            known |= SPARKPLUG_FIELDS
            if not self.mqtt_filter.startswith(("spBv1.0/", "#", "+")):
                raise ValueError("sparkplug_b topics start with 'spBv1.0/'")
        for key in ("asset", "site", "point_id", "location"):
            template = getattr(self, key)
            unknown = template_fields(template) - known if template else set()
            if unknown:
                raise ValueError(
                    f"{key}: unknown placeholder(s) {sorted(unknown)}; known: {sorted(known)}"
                )
        if self.format == "json" and not self.points:
            raise ValueError("format 'json' needs at least one entry in 'points'")
        if self.format == "json" and any(p.path is None for p in self.points):
            raise ValueError("format 'json': every point needs a 'path'")
        if self.format == "value" and len(self.points) > 1:
            raise ValueError("format 'value' takes at most one point")
        return self


class MqttConfig(SourceConfig):
    """An MQTT broker connection (``[sources.<name>]`` with ``type = "mqtt"``).

    Subscriptions are QoS 1 in a persistent session, and each message is acknowledged
    only after its records are committed to the outbox, so nothing is lost across a crash,
    a broker restart or a network outage (as long as the broker keeps the session).
    """

    type: Literal["mqtt"]
    """Source type."""
    host: str
    """Broker host name or address."""
    port: int = Field(default=1883, gt=0, lt=65536)
    """Broker port (1883 plain, 8883 TLS by convention)."""
    protocol: Literal["3.1.1", "5"] = "5"
    """MQTT protocol version."""
    client_id: str = Field(min_length=1, max_length=128)
    """Fixed client id: the broker keeps the session (subscriptions and queued messages)
    under it. It must be unique per broker: another client with the same id kicks this
    one off (logged as ``mqtt_client_id_clash_suspected``)."""
    username: str | None = None
    """User name, if the broker requires one."""
    password: SecretStr | None = None
    """Password. Prefer ``password_file``."""
    password_file: SecretFilePath | None = None
    """File holding the password (mode 600)."""
    keepalive: PositiveDuration = 60.0
    """Keep-alive interval; a dead connection is noticed within about 1.5 times this."""
    session_expiry: PositiveDuration = 7 * 86400.0
    """MQTT 5: how long the broker keeps the session (and queues messages) while the
    agent is away. MQTT 3.1.1 sessions never expire (broker settings permitting)."""
    receive_maximum: int = Field(default=1000, ge=1, le=65535)
    """MQTT 5: most unacknowledged messages the broker may send at once (its flow
    control; MQTT 3.1.1 relies on the broker's ``max_inflight_messages``). The agent's
    memory is bounded by ``max_held_bytes`` whatever the broker does."""
    connect_timeout: PositiveDuration = 15.0
    """Time allowed for connect and subscribe."""
    reconnect_initial: PositiveDuration = 1.0
    """First reconnect delay (full-jitter exponential backoff)."""
    reconnect_cap: PositiveDuration = 60.0
    """Longest reconnect delay."""
    stable_after: PositiveDuration = 30.0
    """A connection that lasted this long resets the backoff; shorter ones count as
    flapping (client-id clash detection)."""
    clash_threshold: int = Field(default=3, ge=2)
    """Consecutive short connections ended by the broker before
    ``mqtt_client_id_clash_suspected`` is logged."""
    max_payload_bytes: ByteSize = 256 * 1024
    """Larger payloads are quarantined (reason ``payload_too_large``, first 4 KiB kept)."""
    batch_max_messages: int = Field(default=1000, ge=1)
    """Messages that arrived together are committed in one append (each acknowledged only
    after it returns); this bounds one such group."""
    max_held_bytes: ByteSize = 64 * 1024 * 1024
    """Most bytes (topic, payload and ~200 bytes of bookkeeping per message) held in memory
    between a message's arrival and its commit: messages pile up there while a commit
    waits, for example on a full outbox with ``when_full = "block"``. When they reach it
    the agent stops reading from the broker, whatever the QoS, until commits bring them
    under half of it (status ``reading_paused``, counter ``read_pauses``): the broker
    queues meanwhile, and no QoS 1 message is dropped or acknowledged before its commit.
    A QoS 0 message read while at the limit (only bytes already in flight) is dropped and
    counted (``dropped_qos0_over_held_limit``). At least ``max_payload_bytes``; memory
    stays within about this plus one message (``max_packet_bytes``)."""
    max_packet_bytes: ByteSize | None = None
    """MQTT 5: the Maximum Packet Size announced to the broker; default 4 x
    ``max_payload_bytes`` + 64 KiB (1088 KiB with the defaults). The broker never sends a
    larger packet: by the MQTT 5 rules it drops such a message for this client, QoS 1
    too, without telling the agent (mosquitto logs ``Dropping too large outgoing PUBLISH
    for <client_id>``), so the agent never reads one whole into memory. Messages
    between ``max_payload_bytes`` and this are quarantined (``payload_too_large``),
    visibly. MQTT 3.1.1 has no such limit: bound message sizes at the broker (mosquitto
    ``max_packet_size``)."""
    tls: TlsConfig | None = None
    """TLS settings; absent means plain TCP."""
    subscriptions: list[SubscriptionConfig] = Field(min_length=1)
    """Topic filters and their mappings. A message goes to the first that matches."""

    def known_points(self) -> set[str] | None:
        """Point names of every subscription; None when one names them from the input
        (Sparkplug without ``points``, ``value`` on a wildcard last level, tag scans)."""
        names: set[str] = set()
        for sub in self.subscriptions:
            if sub.points:
                names.update(p.name for p in sub.points)
            elif sub.format == "value" and sub.mqtt_filter.rsplit("/", 1)[-1] not in "+#":
                names.add(sub.topic.rsplit("/", 1)[-1])
            else:
                return None
        return names

    def unique_keys(self) -> dict[str, UniqueKey]:
        """One client id per broker: a second client with it takes the session over."""
        return {
            "client_id": UniqueKey(
                ("mqtt", self.host.lower(), self.port, self.client_id),
                f"{self.client_id!r} on broker {self.host}:{self.port}",
                "the broker disconnects one client whenever the other connects, forever",
            )
        }

    @field_validator("reconnect_cap")
    @classmethod
    def _check_reconnect(cls, value: float, info: ValidationInfo) -> float:
        return at_least(value, info, "reconnect_initial")

    @model_validator(mode="after")
    def _check_backoff(self) -> MqttConfig:
        if self.max_held_bytes < self.max_payload_bytes:
            raise ValueError("max_held_bytes must be at least max_payload_bytes")
        if self.max_packet_bytes is not None and not (
            self.max_payload_bytes < self.max_packet_bytes <= MQTT_MAX_PACKET
        ):
            raise ValueError(
                "max_packet_bytes must be larger than max_payload_bytes (so that larger "
                f"payloads are quarantined) and at most {MQTT_MAX_PACKET}"
            )
        return self

    @property
    def packet_limit(self) -> int:
        """The Maximum Packet Size announced in CONNECT (MQTT 5), in bytes."""
        if self.max_packet_bytes is not None:
            return self.max_packet_bytes
        return min(4 * self.max_payload_bytes + PACKET_HEADROOM, MQTT_MAX_PACKET)


def profile_point(profile: profiles.Profile, point: profiles.ProfilePoint) -> PointConfig:
    """The MQTT point config of a profile point (points of JSON payloads are optional;
    state and fault points are events, reported on change)."""
    table = point.carried_by("mqtt")
    assert table is not None
    data: dict[str, Any] = {**profiles.common(profile, point), "optional": True, **table}
    if point.kind != "reading":
        data.setdefault("entity", "event")
        data.setdefault("event_field", "code" if point.kind == "fault" else "state")
        data.setdefault("rbe", ReportByException())
    return PointConfig.model_validate(data)


def profile_points(name: str) -> list[PointConfig]:
    """The points of profile ``name`` an MQTT subscription reads. Raises
    :class:`~agent.profiles.ProfileError`."""
    return profiles.convert(profiles.load(name), "mqtt", profile_point)
