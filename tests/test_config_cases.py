"""Golden broken configs: ``edge-agent check-config`` names each problem's key, never a
traceback, and every config field is exercised by at least one case.

Each ``tests/cases/config/<name>.toml`` starts with comment lines::

    # key: sources.meters.devices.lift.interval   (the key path the message must name)
    # message: greater than 0                      (a fragment of that line)
    # covers: sources.meters.rules.0.above, ...    (optional: the fields a table-level
                                                   #  message is about, or Class.field)

and the rest is the config. The cases run in a copy of the folder (``files/`` holds the
fixtures they name, and a SQLite ``files/cmms.db`` is created there), through the real
CLI entry point, exactly as a user runs ``check-config``.

The meta-test walks the pydantic models of the settings root and of every registered
source config: each field must be the target of some case (its key path, or one listed
under ``covers``) or be listed in :data:`FREE_FORM` with the reason no value of the right
type can be wrong. A new config field without a case fails it: add a case.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from agent import config as cfg
from agent import preflight
from agent import sources as source_plugins
from agent.__main__ import main
from agent.sinks import base as sinks

CASES = Path(__file__).parent / "cases" / "config"

# Fields where any value of the right TOML type is valid (names, labels, free text,
# column names checked against the live result set, numbers without a range). A wrong
# type is still an error for them; it just needs no case of its own.
FREE_FORM: dict[str, str] = {
    "AgentSection.site": "any site label",
    "SourceConfig.site": "any site label",
    "ModbusPointConfig.unit": "any unit label",
    "MqttPointConfig.unit": "any unit label",
    "MqttPointConfig.path": "any JSON path; a missing path in a message is bad input",
    "DeviceConfig.asset": "any asset remote id",
    "Code.text": "free text (a type error is covered by modbus_point_code_text)",
    "RuleConfig.values": "any list of values",
    "RuleConfig.max": "any number (a rate rule without it is covered)",
    "SqlSourceConfig.password": "any string (a type error is covered by sql_password)",
    "EntityConfig.fields": "column names, checked against the result set at the first chunk",
}


@dataclass(frozen=True)
class Case:
    name: str
    key: str
    message: str
    covers: tuple[str, ...]
    path: Path


def _cases() -> list[Case]:
    out = []
    for path in sorted(CASES.glob("*.toml")):
        head: dict[str, str] = {}
        for line in path.read_text().splitlines():
            if not line.startswith("# "):
                break
            name, _, value = line[2:].partition(": ")
            head[name] = value
        covers = tuple(c.strip() for c in head.get("covers", "").split(",") if c.strip())
        out.append(Case(path.stem, head["key"], head["message"], covers, path))
    return out


ALL = _cases()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("config-cases")
    shutil.copytree(CASES, work, dirs_exist_ok=True)
    con = sqlite3.connect(work / "files" / "cmms.db")
    con.execute("CREATE TABLE wo (wonum TEXT PRIMARY KEY, descr TEXT, changed_at TEXT)")
    con.commit()
    con.close()
    return work


def test_there_are_enough_cases() -> None:
    assert len(ALL) >= 80, len(ALL)


@pytest.mark.parametrize("case", ALL, ids=[c.name for c in ALL])
def test_check_config_names_the_key(
    case: Case, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(workdir)
    for var in [v for v in os.environ if v.startswith("EDGE_AGENT_")]:
        monkeypatch.delenv(var)
    code = main(["check-config", case.path.name])
    out = capsys.readouterr()
    text = out.err + out.out
    assert "Traceback" not in text, text
    assert code == 2, f"{case.name}: accepted a broken config:\n{text}"
    prefix = f"  {case.key}: " if case.key else "  "
    lines = [line for line in out.err.splitlines() if line.startswith(prefix)]
    assert any(case.message in line for line in lines), (
        f"{case.name}: no problem line for {case.key!r} containing {case.message!r}:\n{out.err}"
    )


def test_the_bases_of_the_cases_are_valid(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each case breaks one thing; the configs it starts from pass (so a case cannot pass
    for a reason other than its own)."""
    monkeypatch.chdir(workdir)
    base = tomllib.loads((CASES / "modbus_interval_zero.toml").read_text())
    del base["sources"]["meters"]["devices"]["lift"]["interval"]
    mqtt = tomllib.loads((CASES / "mqtt_keepalive_zero.toml").read_text())
    del mqtt["sources"]["feed"]["keepalive"]
    sql = tomllib.loads((CASES / "sql_interval_zero.toml").read_text())
    del sql["sources"]["cmms"]["interval"]
    for data in (base, mqtt, sql):
        data["agent"] = {"state_dir": str(workdir / "state")}
        cfg.parse(data, checks=[preflight.start_problems])


# ----------------------------------------------------------------------------- meta


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _label(cls: type[BaseModel], field: str) -> str:
    """``Class.field``, named after the class that declares the field (fields every
    source has belong to SourceConfig); two PointConfig classes get their plugin's name."""
    owner = next(c for c in reversed(cls.__mro__) if field in getattr(c, "__annotations__", {}))
    name = owner.__name__
    if name == "PointConfig":
        name = "ModbusPointConfig" if "modbus" in owner.__module__ else "MqttPointConfig"
    return f"{name}.{field}"


def all_fields() -> set[str]:
    seen: set[type[BaseModel]] = set()
    todo: list[type[BaseModel]] = [cfg.Settings, *source_plugins.config_classes()]
    fields: set[str] = set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for name, info in cls.model_fields.items():
            fields.add(_label(cls, name))
            todo += _models(info.annotation)
    return fields - {f"Settings.{s}" for s in ("agent", "logging", "outbox", "upstream", "api")}


def _field(cls: type[BaseModel], part: str) -> tuple[str, Any] | None:
    for name, info in cls.model_fields.items():
        if part in (name, info.alias):
            return name, info
    return None


def resolve(path: str, data: dict[str, Any]) -> str | None:
    """The ``Class.field`` a key path names, walking the models alongside the data."""
    parts = path.split(".")
    cls: type[BaseModel] = cfg.Settings
    node: Any = data
    i = 0
    while i < len(parts):
        found = _field(cls, parts[i])
        if found is None:
            return None
        name, info = found
        node = node.get(parts[i]) if isinstance(node, dict) else None
        if i == len(parts) - 1:
            return _label(cls, name)
        i += 1
        origin = typing.get_origin(info.annotation)
        args = typing.get_args(info.annotation)
        if name == "upstream":  # the sink's config class, by upstream.type
            kind = (node or {}).get("type", sinks.DEFAULT_TYPE) if isinstance(node, dict) else ""
            cls = sinks.sink_plugin(
                kind if kind in sinks.SINKS else sinks.DEFAULT_TYPE
            ).config_class
            continue
        if name == "sources":
            kind = (node or {}).get(parts[i], {}).get("type")
            classes = {
                c.model_fields["type"].annotation.__args__[0]: c
                for c in source_plugins.config_classes()
            }
            if kind not in classes:
                return None
            cls, node, i = classes[kind], (node or {}).get(parts[i]), i + 1
            if i == len(parts):
                return None
            continue
        models = _models(info.annotation)
        if name == "upstream" and len(models) > 1:  # the sink's class, by upstream.type
            kind = (node or {}).get("type", "http") if isinstance(node, dict) else "http"
            models = [m for m in models if m.model_fields["type"].default == kind] or models
        if not models:
            return None
        if origin is dict or dict in [typing.get_origin(a) for a in args]:
            node = (node or {}).get(parts[i]) if isinstance(node, dict) else None
            i += 1
        elif origin is list or list in [typing.get_origin(a) for a in args]:
            node = node[int(parts[i])] if isinstance(node, list) and parts[i].isdigit() else None
            i += 1
        if i == len(parts):
            return None
        cls = models[0]
    return None


def test_every_config_field_has_a_case_or_is_free_form() -> None:
    covered: set[str] = set()
    for case in ALL:
        try:
            data = tomllib.loads(case.path.read_text())
        except tomllib.TOMLDecodeError:
            continue
        for path in (case.key, *case.covers):
            # A covers entry may name the field as Class.field (when no path resolves,
            # e.g. the type of a source whose type is unknown).
            label = path if path[:1].isupper() else resolve(path, data)
            if label is not None:
                covered.add(label)
    fields = all_fields()
    stale = sorted(set(FREE_FORM) - fields)
    assert not stale, f"FREE_FORM names fields that do not exist: {stale}"
    missing = sorted(fields - covered - set(FREE_FORM))
    assert not missing, (
        "config fields without a broken-config case in tests/cases/config/ (add one, or "
        f"list the field in FREE_FORM with the reason no value can be wrong): {missing}"
    )


def test_resolve_walks_tables_lists_and_source_types() -> None:
    data = tomllib.loads((CASES / "rule_request_hold.toml").read_text())
    assert resolve("sources.meters.rules.0.maintenance_request.hold", data) == (
        "RequestConfig.hold"
    )
    assert resolve("sources.meters.devices.lift.interval", data) == "DeviceConfig.interval"
    assert resolve("sources.meters.enabled", data) == "SourceConfig.enabled"
    assert resolve("upstream.url", data) == "HttpConfig.url"
    assert resolve("upstream.backoff_cap", data) == "UpstreamConfig.backoff_cap"
    assert resolve("sources.meters.nonesuch", data) is None
