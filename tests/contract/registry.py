"""What the contract suites read from the plugin registries (one place, so a registry
that changes shape changes only this module)."""

from __future__ import annotations

from typing import Any

from agent import sources
from agent.sinks.base import SINKS, sink_plugin
from agent.sources.base import Source, SourceConfig, SourceContext, Tap

CONTEXT = SourceContext(agent_id="contract-agent", site="contract-site")


def source_types() -> list[str]:
    """Every registered source type, in registry order."""
    return sources.source_types()


def config_class(kind: str) -> type[SourceConfig]:
    """The config class source type ``kind`` registered."""
    return sources.source_plugin(kind).config_class


def build_source(kind: str, name: str, config: SourceConfig) -> Source:
    """A new source of type ``kind``, as the supervisor builds one."""
    source: Source = sources.source_plugin(kind).build(name, config, CONTEXT)
    return source


def tap_of(kind: str) -> Tap[Any] | None:
    """The tap source type ``kind`` declared (``edge-agent tap``), or None."""
    return sources.source_plugin(kind).tap


def sink_types() -> list[str]:
    """Every registered sink type, in registry order."""
    return list(SINKS)


__all__ = [
    "CONTEXT",
    "build_source",
    "config_class",
    "sink_plugin",
    "sink_types",
    "source_types",
    "tap_of",
]
