"""The sink contract, the ``[upstream]`` keys every sink shares, and the sink registry.

A sink delivers leased outbox records to one upstream. The forwarder
(:mod:`agent.forwarder`) knows only :class:`Sink`: it leases a batch, awaits
:meth:`Sink.send` (that await is the backpressure), and settles each record by the
outcome the sink reports. A sink says for every record one of:

* accepted, or duplicate (the upstream had it already): acked, i.e. deleted;
* rejected, with a code and message: dead-lettered with that reason;
* nothing: sent again after the backoff (``SendResult.retry_after`` when the upstream
  asked for a delay).

Or, for the whole batch, it raises a typed error (:mod:`agent.errors`):
:class:`~agent.errors.TransientError` (retry with backoff, ``retry_after`` honoured),
:class:`~agent.errors.ReauthorizationRequired` (wait for new credentials),
:class:`~agent.errors.BatchTooLarge` (split) or :class:`~agent.errors.BatchRejected`
(bisect down to the refused records). Which upstream answer means what is the sink's
business; what the forwarder does with each verdict is the forwarder's.

Adding a sink (docs/architecture.md): one module defining its config class (a
:class:`UpstreamConfig` subclass whose ``type`` is a ``Literal``), its :class:`Sink`
class and ``plugin = SinkPlugin(...)``; ONE line in :data:`SINKS`; its table in
config.example.toml; one parameter of the sink contract suite (tests/contract).
"""

from __future__ import annotations

import abc
import builtins
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import ValidationInfo, field_validator

from agent.configtypes import ByteSize, Duration, PositiveDuration, Section, at_least
from agent.health import Health, State, Tracker
from agent.outbox import Leased
from agent.sources.base import UniqueKey

SINKS: dict[str, str] = {
    # upstream.type: module defining ``plugin``
    "http": "agent.sinks.http",
    "mqtt": "agent.sinks.mqtt",
    "nats": "agent.sinks.nats",
}
"""Every sink type and the module that implements it (loaded when first asked for)."""

DEFAULT_TYPE = "http"
"""The sink of an ``[upstream]`` table without ``type`` (every config before sinks were
plugins)."""


class UpstreamConfig(Section):
    """Where records go (``[upstream]``): what every sink type shares. ``type`` picks the
    sink (default ``http``); each sink's own keys are in its module."""

    type: str = DEFAULT_TYPE
    """Which sink delivers the records (``http``: the unified maintenance API)."""
    batch_max_records: int = 1000
    """Most records in one request."""
    batch_max_bytes: ByteSize = 4 << 20
    """Most record bytes in one request (before compression)."""
    backoff_initial: PositiveDuration = 1.0
    """First retry delay after a transient failure (full-jitter exponential)."""
    backoff_cap: PositiveDuration = 300.0
    """Longest retry delay."""
    reauth_probe_interval: PositiveDuration = 300.0
    """While the credentials are refused (HTTP 401/403): how often to probe again."""
    concurrency: int = 1
    """Requests in flight at once. Per-entity order holds at any value."""
    drain_timeout: Duration = 30.0
    """On shutdown: how long to keep delivering before exiting (the rest stays queued)."""

    def target(self) -> str:
        """Where records go, for messages and status (never a credential)."""
        return self.type

    def unique_keys(self) -> dict[str, UniqueKey]:
        """Settings no enabled source may share with this sink (an MQTT client id)."""
        return {}

    @field_validator("backoff_cap")
    @classmethod
    def _check_backoff(cls, value: float, info: ValidationInfo) -> float:
        return at_least(value, info, "backoff_initial")

    @field_validator("concurrency", "batch_max_records")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value


@dataclass(slots=True)
class Rejection:
    """A record the upstream refused, with its code and message."""

    id: str
    code: str
    message: str


@dataclass(slots=True)
class SendResult:
    """What the upstream did with a batch it answered: the per-record outcome.

    Records named in none of the lists are sent again after the backoff, or after
    ``retry_after`` seconds when the upstream asked for that.
    """

    accepted: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    status: int = 200
    """The upstream's status code (HTTP) or an equivalent; for logs."""
    request_id: str | None = None
    """The id to quote to the upstream's operators."""
    wire_bytes: int = 0
    """Bytes this attempt sent."""
    retry_after: float | None = None
    """Delay the upstream asked for before the unnamed records are sent again."""


class Sink(abc.ABC):
    """One upstream the forwarder delivers to; see the module docstring.

    ``send`` may be awaited by ``upstream.concurrency`` workers at once, and must not
    reorder a batch's records. A sink never acks or dead-letters anything itself: it
    reports, and the forwarder settles.
    """

    type: ClassVar[str]
    """The ``upstream.type`` this class implements."""

    def __init__(self, config: UpstreamConfig, agent_id: str) -> None:
        self.config = config
        self.agent_id = agent_id
        self.tracker = Tracker(State.STARTING, "not opened yet")

    async def open(self) -> None:  # noqa: B027 - optional: a sink that connects lazily
        """Connect (or prepare to); called once before the first ``send``. A peer that is
        unreachable here is a transient failure for ``send`` to report, not an error."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection; nothing is sent afterwards."""

    @abc.abstractmethod
    async def send(self, batch: Sequence[Leased], *, batch_id: str) -> SendResult:
        """Send ``batch`` once and report each record's outcome, or raise a typed error
        for the whole batch. ``batch_id`` stays the same when the forwarder retries the
        same records (an idempotency key)."""

    def reconfigure(self, config: UpstreamConfig, agent_id: str) -> None:
        """Apply a reloaded ``[upstream]`` of the same type: new credentials take effect
        on the next ``send``. The default keeps the new config for the next request."""
        self.config = config
        self.agent_id = agent_id

    def health(self) -> Health:
        """The sink's own view of its peer (a connection's state); the forwarder adds
        what the answers said."""
        return self.tracker.health

    def describe(self) -> str:
        """Where records go, for logs and status (never a credential)."""
        return self.config.target()

    def status(self) -> dict[str, Any]:
        """Sink-specific figures merged into the ``upstream`` part of ``/v1/status``."""
        return {}


@dataclass(frozen=True, slots=True)
class SinkPlugin:
    """What a sink module registers: its type, config class and sink class."""

    type: str
    config_class: builtins.type[UpstreamConfig]
    sink_class: builtins.type[Sink]

    def build(self, config: UpstreamConfig, agent_id: str) -> Sink:
        """A new sink for ``config`` (of this plugin's config class)."""
        assert isinstance(config, self.config_class), type(config)
        return self.sink_class(config, agent_id)


def sink_plugin(kind: str) -> SinkPlugin:
    """The plugin of ``upstream.type`` ``kind``; KeyError when there is none."""
    module = importlib.import_module(SINKS[kind])
    plugin = module.plugin
    if not isinstance(plugin, SinkPlugin) or plugin.type != kind:
        raise TypeError(f"{SINKS[kind]}.plugin must be a SinkPlugin of type {kind!r}")
    return plugin


def sink_plugins() -> list[SinkPlugin]:
    """Every registered sink plugin, in registry order."""
    return [sink_plugin(kind) for kind in SINKS]


def build_sink(config: UpstreamConfig, agent_id: str) -> Sink:
    """The sink ``config.type`` names, built for ``config``."""
    return sink_plugin(config.type).build(config, agent_id)
