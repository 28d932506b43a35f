"""The contract every source implements, and what the supervisor hands it.

A source turns raw input into :class:`~agent.records.Record` objects and hands them to
``await out.append(...)``. That await returns once the records (and the source's cursor)
are durably committed, and it is the backpressure: a source acknowledges its input (MQTT
PUBACK, SQL watermark) only after it returns. ``run`` runs until cancelled and never
swallows :class:`asyncio.CancelledError`; any other exception ends the run and the
supervisor restarts the source with jittered backoff.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, NamedTuple, Protocol, TypeVar

from pydantic import Field, field_validator

from agent.configtypes import Section
from agent.health import Component, Kind, State, Tracker
from agent.outbox import AppendResult, Cursor, Quarantined
from agent.profiles import Converter
from agent.records import Record, SourceRef
from agent.rules.config import RuleConfig, check_unique

if TYPE_CHECKING:
    from agent.outbox_keys import KeySet
    from agent.rules.engine import RuleEngine


class UniqueKey(NamedTuple):
    """A setting that must be unique across enabled sources, and why."""

    identity: tuple[Any, ...]
    """What must differ (MQTT: broker host, port and client id)."""
    shown: str
    """The value and its scope, for the message: ``'gw1' on broker mq:1883``."""
    why: str
    """What goes wrong when two sources share it."""


class SourceConfig(Section):
    """Fields every ``[sources.<name>]`` table has; each source type adds its own."""

    type: str
    """Which kind of source this is (``mqtt``, ``modbus``, ``sql``)."""
    enabled: bool = True
    """A disabled source is validated but not started."""
    site: str | None = None
    """Site stamped on this source's records; default: ``agent.site``."""
    rules: list[RuleConfig] = Field(default_factory=list)
    """Edge rules evaluated on this source's records (``[[sources.<name>.rules]]``,
    docs/rules.md)."""

    @field_validator("rules")
    @classmethod
    def _unique_rules(cls, value: list[RuleConfig]) -> list[RuleConfig]:
        return check_unique(value)

    def known_points(self) -> set[str] | None:
        """Every point name this source's records can carry (``data.point``), or None when
        that depends on the input (wildcard topics, Sparkplug metrics named in a BIRTH)."""
        return None

    def files(self) -> dict[str, Path]:
        """Files this source needs that no ``*_file`` setting names, by key (a SQLite
        database in ``url``): check-config and the start check they exist."""
        return {}

    def unique_keys(self) -> dict[str, UniqueKey]:
        """Settings that must not be shared with another enabled source, by key name
        (MQTT: one ``client_id`` per broker). Two sources with one identity are a config
        error."""
        return {}

    def problems(self) -> list[tuple[str, str]]:
        """Problems found across this source's tables, as (key path below the source,
        message): rules on points the source never produces."""
        points = self.known_points()
        if points is None:
            return []
        return [
            (
                f"rules.{i}.point",
                f"rule {rule.name!r} watches point {rule.point!r}, which this source does "
                f"not produce (it has: {', '.join(sorted(points)) or 'no points'})",
            )
            for i, rule in enumerate(self.rules)
            if rule.point not in points
        ]


class Output(Protocol):
    """Where a source puts its records, and the outbox reads it may make: what
    :class:`~agent.pipeline.Pipeline` offers a source, and what it needs of the outbox
    (:class:`~agent.outbox.Outbox`, or a test double of it)."""

    async def append(
        self,
        records: Sequence[Record],
        cursor: Cursor | Sequence[Cursor] | None = None,
        *,
        dedupe: bool = False,
        quarantine: Sequence[Quarantined] = (),
    ) -> AppendResult:
        """Commit records (and cursor, and quarantined inputs) durably; see Outbox.append."""
        ...

    async def cursor(self, source: str, key: str) -> Any | None:
        """The last committed cursor value (None when never set)."""
        ...

    async def cursors(self, source: str) -> dict[str, Any]:
        """Every committed cursor of ``source``, by key (the rules engine's state)."""
        ...

    def key_set(self, source: str, name: str) -> KeySet:
        """Reads of a source's key set (SQL reconciliation; see agent.outbox_keys)."""
        ...


@dataclass(frozen=True, slots=True)
class SourceContext:
    """What the supervisor tells a source about the agent it runs in."""

    agent_id: str
    site: str | None


class Source(abc.ABC):
    """Base class of sources: a name, a config, a health, a status, and ``run``.

    A source keeps its own :class:`~agent.health.Health` in ``self.tracker`` (it starts
    ``starting``; the source says ``ok`` once it has proven its peer, ``retrying`` while
    the peer is away...; see :mod:`agent.health`). The supervisor adds what it knows
    (crashed, crash-looping, stopped); readiness, status and metrics read the result.
    """

    system: ClassVar[str] = "unknown"
    """The ``source.system`` of this source's records (``mqtt``, ``modbus``, ``sap_ecc``...)."""
    rules: RuleEngine | None = None
    """The source's rules engine while it runs with rules (set by the supervisor)."""

    def __init__(self, name: str, config: SourceConfig, context: SourceContext) -> None:
        self.name = name
        self.config = config
        self.context = context
        self.tracker = Tracker(State.STARTING, "not started yet")

    @property
    def ref(self) -> SourceRef:
        """The ``source`` object stamped on this source's records."""
        return SourceRef(self.name, self.system, self.config.site or self.context.site)

    @abc.abstractmethod
    async def run(self, out: Output) -> None:
        """Read input and append records until cancelled."""

    def health(self) -> Component:
        """This source's own health, with its parts' (Modbus devices, SQL entities)."""
        return Component(Kind.SOURCE, self.name, self.tracker.health)

    def status(self) -> dict[str, Any]:
        """Source-specific status figures (last success, last error, counters). The
        supervisor adds the health (``state``, ``reason``, ``since``, ``detail``)."""
        return {}


# ---------------------------------------------------------------------- the plugin record

C = TypeVar("C", bound=SourceConfig)
S = TypeVar("S", bound=Source)

Problems = list[tuple[str, str]]
"""Problems as ``(key path, message)``, the shape :class:`~agent.errors.ConfigError` takes."""


@dataclass(frozen=True, slots=True)
class SyncAbility(Generic[S]):
    """A source that syncs on demand and reports per-entity sync state (SQL).

    ``request(source, entities, full)`` is ``POST /v1/sources/{name}/sync`` (unknown
    entity names raise KeyError; returns what was scheduled); ``status(source)`` is the
    source's part of ``/v1/sync-status``.
    """

    request: Callable[[S, list[str] | None, bool], list[str]]
    status: Callable[[S], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class TapRequest:
    """What ``edge-agent tap`` asks a source for: records it would produce right now,
    written nowhere (no outbox, no acknowledgement, no cursor moved)."""

    entity: str | None = None
    """Only this entity (SQL) or device (Modbus); None: everything. MQTT has none."""
    limit: int = 10
    """MQTT: the messages to take; SQL: the rows per entity; Modbus: unused (one poll
    of every device)."""
    timeout: float = 10.0
    """Longest wait for input that comes when it comes (MQTT)."""


Tapped = Record | Quarantined
"""One tapped item: a record as the upstream would get it, or a bad input with its
reason (shown, never hidden)."""

Tap = Callable[[str, C, SourceContext, TapRequest], AsyncIterator[Tapped]]
"""``tap(name, config, context, request)``: the items a source would produce now."""


@dataclass(frozen=True, slots=True)
class SourcePlugin(Generic[C, S]):
    """What a source module registers (``plugin = SourcePlugin(...)``): its type, config
    class and source class, and the optional abilities it has. The core asks this record
    what a source can do; it never probes a source or module with ``getattr``.
    """

    type: str
    """The ``[sources.<name>] type`` this plugin implements."""
    config_class: builtins.type[C]
    source_class: builtins.type[S]
    probe: Callable[[str, C], Awaitable[Problems]] | None = None
    """``check-config --connect``: ask the live peer whether the config fits it."""
    explain: Callable[[C], str] | None = None
    """``check-config --explain``: what the source will do, as text (Modbus read plans)."""
    sync: SyncAbility[S] | None = None
    """Manual and full syncs, and ``/v1/sync-status`` (SQL)."""
    tap: Tap[C] | None = None
    """``edge-agent tap``: the records the source would produce now, written nowhere."""
    rules: bool = False
    """Whether edge rules (``[[sources.<name>.rules]]``) run on this source's records."""
    profile_point: Converter | None = None
    """For sources whose points can come from an equipment profile (docs/profiles.md):
    one profile point, from the table named after this type, as this source's point
    config (a table that does not fit raises)."""

    def build(self, name: str, config: SourceConfig, context: SourceContext) -> S:
        """A new source ``name`` for ``config`` (of this plugin's config class)."""
        assert isinstance(config, self.config_class), type(config)
        return self.source_class(name, config, context)

    def capabilities(self) -> list[str]:
        """The optional abilities this plugin declares, by name (for messages and docs)."""
        named = {
            "probe": self.probe,
            "explain": self.explain,
            "sync": self.sync,
            "tap": self.tap,
            "rules": self.rules or None,
            "profiles": self.profile_point,
        }
        return [name for name, ability in named.items() if ability is not None]
