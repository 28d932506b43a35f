"""agent/ has no import cycles: a module graph read with ``ast`` from the source files.

Every ``import`` and ``from ... import`` counts, at module level and inside functions (a
function-level import that dodges a cycle at load time is still a cycle in the design).
Exempt: imports under ``if TYPE_CHECKING:``; they never run, and annotations are strings
(``from __future__ import annotations``), so they tie nothing together at run time.

A package's ``__init__`` importing its own submodules is not a cycle on its own: importing
``agent.sources.sql.source`` runs ``agent/sources/sql/__init__.py`` first, but that is
Python's package machinery, not an edge a module wrote, so parents are not edges.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import agent

ROOT = Path(agent.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) of every import that runs, anywhere."""
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                keep = len(base) - node.level + (1 if is_package else 0)
                target = ".".join([*base[:keep], *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.append((target, [alias.name for alias in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the agent modules it imports (a ``from pkg import sub`` names ``pkg.sub``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for target, names in _imports(tree, name, path.name == "__init__.py"):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            # ``from pkg import sub``: the edge goes to the submodule; names that are not
            # submodules are attributes of ``pkg`` itself
            if target in modules and (len(subs) < len(names) or not names):
                graph[name].add(target)
            graph[name].update(subs)
        graph[name].discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_agent_has_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles in agent/: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_walker_sees_function_level_imports_and_exempts_type_checking() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from agent.app import Agent\n"
        "def f():\n    from agent import api\n    from . import base\n"
    )
    found = _imports(tree, "agent.sources.x", is_package=False)
    assert ("agent", ["api"]) in found
    assert ("agent.sources", ["base"]) in found
    assert all(target != "agent.app" for target, _ in found)


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_cycle_finder(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert cycles(graph) == expected


def test_graph_knows_the_agent_modules() -> None:
    graph = import_graph()
    assert "agent.sources.sql.sync" in graph["agent.sources.sql.source"]
    assert "agent.profiles" in graph


MQTT_ADAPTER = ROOT / "sources" / "mqtt" / "client.py"


def _private_accesses(tree: ast.AST) -> list[tuple[int, str]]:
    """``x._name`` (not a dunder) on anything but ``self``/``cls``: another object's
    private attribute."""
    return [
        (node.lineno, node.attr)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"})
    ]


def test_paho_and_aiomqtt_internals_only_in_the_mqtt_adapter() -> None:
    """Outside agent/sources/mqtt/client.py, no module that uses aiomqtt or paho reads a
    private attribute of another object; inside it, every private name it reads is one
    its docstring gives the reason for."""
    stray = []
    for path in sorted(ROOT.rglob("*.py")):
        if path == MQTT_ADAPTER:
            continue
        tree = ast.parse(path.read_text(), str(path))
        libs = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in (
                node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
            )
        }
        if libs & {"aiomqtt", "paho"}:
            stray += [
                f"{path.relative_to(ROOT)}:{line} .{name}" for line, name in _private_accesses(tree)
            ]
    assert stray == []
    tree = ast.parse(MQTT_ADAPTER.read_text())
    reasons = ast.get_docstring(tree) or ""
    accessed = {name for _, name in _private_accesses(tree)}
    assert accessed, "the adapter reads no internals any more: update this test"
    unexplained = [n for n in accessed if not re.search(rf"\b{n}\b", reasons)]
    assert sorted(unexplained) == []
