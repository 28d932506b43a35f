"""Source plugins. Adding one: its package, and ONE line in :data:`SOURCES`.

Each plugin package defines ``plugin = SourcePlugin(...)``
(:class:`~agent.sources.base.SourcePlugin`): its type, config class (a
:class:`~agent.sources.base.SourceConfig` subclass whose ``type`` is a ``Literal`` of the
registry key), source class, and the optional abilities it declares (probe, explain,
sync, tap, rules). The core asks :func:`source_plugin` what a source can do.
"""

from __future__ import annotations

import importlib
from typing import Any

from agent.profiles import Converter
from agent.sources.base import SourceConfig, SourcePlugin

SOURCES: dict[str, str] = {
    # type: package defining ``plugin``
    "modbus": "agent.sources.modbus",
    "mqtt": "agent.sources.mqtt",
    "sql": "agent.sources.sql",
}
"""Every source type and the package that implements it (loaded when first asked for)."""


def source_types() -> list[str]:
    """Every registered source type, in registry order."""
    return list(SOURCES)


def source_plugin(kind: str) -> SourcePlugin[Any, Any]:
    """The plugin of source type ``kind``; KeyError when there is none."""
    module = importlib.import_module(SOURCES[kind])
    plugin = module.plugin
    if not isinstance(plugin, SourcePlugin) or plugin.type != kind:
        raise TypeError(f"{SOURCES[kind]}.plugin must be a SourcePlugin of type {kind!r}")
    return plugin


def source_plugins() -> list[SourcePlugin[Any, Any]]:
    """Every registered source plugin, in registry order."""
    return [source_plugin(kind) for kind in SOURCES]


def profile_carriers() -> dict[str, Converter]:
    """Every source type whose points can come from a profile, and its converter."""
    return {p.type: p.profile_point for p in source_plugins() if p.profile_point is not None}


def config_classes() -> list[type[SourceConfig]]:
    """Every registered source config class, for the config union."""
    return [p.config_class for p in source_plugins()]
