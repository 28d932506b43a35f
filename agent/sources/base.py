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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

from pydantic import Field, field_validator

from agent.configtypes import Section
from agent.outbox import AppendResult, Cursor, Quarantined
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
    """Where a source puts its records: the outbox (or a test double of it)."""

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

    def key_set(self, source: str, name: str) -> KeySet:
        """Reads of a source's key set (SQL reconciliation; see agent.outbox_keys)."""
        ...


@dataclass(frozen=True, slots=True)
class SourceContext:
    """What the supervisor tells a source about the agent it runs in."""

    agent_id: str
    site: str | None


class Source(abc.ABC):
    """Base class of sources: a name, a config, a status, and ``run``."""

    system: ClassVar[str] = "unknown"
    """The ``source.system`` of this source's records (``mqtt``, ``modbus``, ``sap_ecc``...)."""
    rules: RuleEngine | None = None
    """The source's rules engine while it runs with rules (set by the supervisor)."""

    def __init__(self, name: str, config: SourceConfig, context: SourceContext) -> None:
        self.name = name
        self.config = config
        self.context = context

    @property
    def ref(self) -> SourceRef:
        """The ``source`` object stamped on this source's records."""
        return SourceRef(self.name, self.system, self.config.site or self.context.site)

    @abc.abstractmethod
    async def run(self, out: Output) -> None:
        """Read input and append records until cancelled."""

    def status(self) -> dict[str, Any]:
        """Source-specific status figures (state, last success, last error, counters)."""
        return {}
