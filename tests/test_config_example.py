"""config.example.toml documents every option of every config class, and loads.

The example is the user's reference: each field of every section (the agent's own, every
registered source type's, every sink's, and the tables nested in them) must appear in it
as ``key = value``, live or commented out (``# key = value``), in a table of the right
kind. The walk of the config classes is the one the broken-config meta-test uses
(tests/test_config_cases.py), so a new field fails both until it is documented and has a
case.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from tests.test_config_cases import all_fields, resolve

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"

# ``[table]``/``[[table]]`` and ``key = value`` lines commented out once: ``# key = 1``.
_HEADER = re.compile(r"^#? ?(\[\[?)\s*([A-Za-z0-9_.\-]+)\s*\]\]?\s*(?:#.*)?$")
_COMMENTED_KEY = re.compile(r"^# ?([A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z_\"0-9\-]+)*)\s*=\s*\S")

# Fields the example leaves out on purpose, with the reason.
NOT_IN_EXAMPLE: dict[str, str] = {}


def _flatten(node: Any, prefix: str) -> list[str]:
    """Every key path in a parsed TOML value, array elements numbered."""
    out = [prefix] if prefix else []
    items: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = [(str(i), v) for i, v in enumerate(node)]
    for key, value in items:
        out += _flatten(value, f"{prefix}.{key}" if prefix else key)
    return out


def documented_paths(text: str) -> list[str]:
    """Every key path the example shows: what it sets, and what it shows commented out
    (``# key = value`` below a live or commented-out ``[table]``)."""
    return [path for path, _ in _documented(text)]


def documented_labels(text: str) -> set[str]:
    """The ``Class.field`` of every documented path. A commented-out table whose first
    key is ``# type = "x"`` (another sink's ``[upstream]``) resolves as that type."""
    data = tomllib.loads(text)
    labels: set[str] = set()
    for path, kind in _documented(text):
        scope = data
        if kind is not None:
            top = path.split(".")[0]
            scope = {**data, top: {"type": kind}}
        if label := resolve(path, scope):
            labels.add(label)
    return labels


def _documented(text: str) -> list[tuple[str, str | None]]:
    """``(path, type of the commented-out table it is in, if that table names one)``."""
    paths: list[tuple[str, str | None]] = [(p, None) for p in _flatten(tomllib.loads(text), "")]
    header = ""
    kind: str | None = None
    commented = False
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if m := _HEADER.match(line):
            name = m.group(2)
            if m.group(1) == "[[":
                parent = _numbered(name, counts)
                counts[parent] = counts.get(parent, -1) + 1
                header = f"{parent}.{counts[parent]}"
            else:
                header = _numbered(name, counts)
            kind = None
            commented = line.startswith("#")
            if commented:  # a commented-out table documents its field
                paths.append((header, None))
            continue
        if _COMMENTED_KEY.match(line):
            try:
                value = tomllib.loads(line[1:].strip())
            except tomllib.TOMLDecodeError:
                continue  # prose that happens to contain " = "
            if commented and "type" in value and kind is None:
                kind = str(value["type"])
            paths += [(p, kind) for p in _flatten(value, header)]
    return paths


def commented_tables(text: str) -> list[dict[str, Any]]:
    """Each commented-out table (``# [upstream]`` and its ``# key = value`` lines) as
    TOML of its own: a variant of a live table (another sink type) resolves by its own
    ``type``, not by the live table's."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if m := _HEADER.match(line):
            current = None
            if line.startswith("#") and m.group(1) == "[":
                current = [f"[{m.group(2)}]"]
                blocks.append(current)
            continue
        if current is not None and _COMMENTED_KEY.match(line):
            try:
                tomllib.loads(line[1:].strip())
            except tomllib.TOMLDecodeError:
                continue
            current.append(line[1:].strip())
    return [tomllib.loads("\n".join(block)) for block in blocks]


def _numbered(name: str, counts: dict[str, int]) -> str:
    """``name`` with the current element index after each array-of-tables prefix."""
    out: list[str] = []
    for part in name.split("."):
        out.append(part)
        prefix = ".".join(out)
        if prefix in counts and prefix != name:
            out.append(str(counts[prefix]))
    return ".".join(out)


def test_example_documents_every_config_field() -> None:
    text = EXAMPLE.read_text()
    data = tomllib.loads(text)
    documented = {label for p in documented_paths(text) if (label := resolve(p, data))}
    for block in commented_tables(text):  # e.g. another sink's [upstream]
        documented |= {label for p in _flatten(block, "") if (label := resolve(p, block))}
    missing = sorted(all_fields() - documented - set(NOT_IN_EXAMPLE))
    assert not missing, (
        "config fields config.example.toml does not show (add `# key = default` with a "
        f"comment to the right table, or list them in NOT_IN_EXAMPLE with why): {missing}"
    )
    stale = sorted(set(NOT_IN_EXAMPLE) - all_fields())
    assert not stale, f"NOT_IN_EXAMPLE names fields that do not exist: {stale}"


def test_the_walk_sees_nested_inline_and_commented_keys() -> None:
    text = (
        '[sources.m]\ntype = "mqtt"\n# [sources.m.tls]\n# ca_file = "/x"\n'
        '[[sources.m.subscriptions]]\ntopic = "a"\nrbe = { deadband = 1 }\n'
        '[[sources.m.subscriptions.points]]\nname = "p"\n'
        "[[sources.m.subscriptions]]\n# qos = 1\n# Prose, with a = sign in it.\n"
    )
    paths = documented_paths(text)
    for path in (
        "sources.m.tls",
        "sources.m.tls.ca_file",
        "sources.m.subscriptions.0.topic",
        "sources.m.subscriptions.0.rbe.deadband",
        "sources.m.subscriptions.0.points.0.name",
        "sources.m.subscriptions.1.qos",
    ):
        assert path in paths
    data = tomllib.loads(text)
    labels = {resolve(p, data) for p in paths}
    assert {"TlsConfig.ca_file", "ReportByException.deadband", "SubscriptionConfig.qos"} <= labels
    assert not any("Prose" in p for p in paths)
