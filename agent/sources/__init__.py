"""Source plugins. Adding one: its module, and ONE line in :data:`REGISTRY`.

Each plugin module defines ``config_class`` (a :class:`~agent.sources.base.SourceConfig`
subclass whose ``type`` is a ``Literal`` of the registry key) and ``source_class`` (a
:class:`~agent.sources.base.Source` subclass).
"""

from __future__ import annotations

import importlib
from types import ModuleType

REGISTRY: dict[str, str] = {
    # type: module
    "modbus": "agent.sources.modbus",
    "mqtt": "agent.sources.mqtt",
    "sql": "agent.sources.sql",
}


def plugin(kind: str) -> ModuleType:
    """The module implementing source type ``kind``."""
    return importlib.import_module(REGISTRY[kind])


def config_classes() -> list[type]:
    """Every registered source config class, for the config union."""
    return [plugin(kind).config_class for kind in REGISTRY]
