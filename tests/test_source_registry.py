"""The source registry: every plugin record is what its registry line says, and what it
declares is what the core then finds (no ``getattr`` probing)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from agent import sources
from agent.sources.base import Source, SourceConfig, SourcePlugin


@pytest.mark.parametrize("kind", sources.source_types())
def test_each_registered_type_has_its_plugin_record(kind: str) -> None:
    plugin = sources.source_plugin(kind)
    assert isinstance(plugin, SourcePlugin)
    assert plugin.type == kind
    assert issubclass(plugin.config_class, SourceConfig)
    assert issubclass(plugin.source_class, Source)
    # the config's ``type`` literal is the registry key: the union discriminates on it
    assert plugin.config_class.model_fields["type"].annotation.__args__ == (kind,)


def test_declared_capabilities() -> None:
    declared = {p.type: p.capabilities() for p in sources.source_plugins()}
    assert declared == {
        "modbus": ["explain", "tap", "rules", "profiles"],
        "mqtt": ["tap", "rules", "profiles"],
        "sql": ["probe", "sync", "tap"],
    }


def test_unknown_type_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        sources.source_plugin("bacnet")


def test_config_classes_follow_the_registry() -> None:
    assert sources.config_classes() == [p.config_class for p in sources.source_plugins()]


def test_plugin_configs_are_built_whole_never_written_into() -> None:
    """Source config models are frozen: a validator that fills something in (profile
    points, a default table) does it before the model is built, never with
    ``object.__setattr__`` afterwards."""
    root = Path(sources.__file__).parent
    writes = [
        f"{path.relative_to(root)}:{node.lineno}"
        for path in sorted(root.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "object.__setattr__"
    ]
    assert writes == []
