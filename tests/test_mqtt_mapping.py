"""MQTT payload mapping: golden cases (tests/cases/mqtt/<name>/) and unit checks.

Each case folder holds ``config.toml`` (one MQTT source table), ``input.jsonl`` (one
message per line: ``topic``, and ``payload`` (JSON), ``payload_text``, ``payload_hex`` or
``sparkplug``; optional ``received_at``) and ``expected.jsonl`` (one line per output, in
order: ``{"record": ...}`` or ``{"quarantine": ...}``; a last ``{"counters": ...}`` line).
Regenerate after a deliberate change with ``UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import os
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.records import SourceRef
from agent.sources.mqtt import MqttConfig, sparkplug
from agent.sources.mqtt.mapping import _MISSING as MISSING
from agent.sources.mqtt.mapping import Mapper, lookup, match_topic

CASES = Path(__file__).parent / "cases" / "mqtt"
RECEIVED = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def payload_of(line: dict[str, Any]) -> bytes:
    if "payload_text" in line:
        return line["payload_text"].encode()
    if "payload_hex" in line:
        return bytes.fromhex(line["payload_hex"])
    if "sparkplug" in line:
        sp = line["sparkplug"]
        metrics = [sparkplug.Metric(**m) for m in sp.get("metrics", [])]
        return sparkplug.encode(
            sparkplug.Payload(timestamp=sp.get("timestamp"), seq=sp.get("seq"), metrics=metrics)
        )
    return orjson.dumps(line["payload"])


def run_case(folder: Path) -> list[dict[str, Any]]:
    config = MqttConfig.model_validate(tomllib.loads((folder / "config.toml").read_text()))
    mapper = Mapper(SourceRef("plant", "mqtt", config.site or "site-default"), config)
    out: list[dict[str, Any]] = []
    for raw in (folder / "input.jsonl").read_text().splitlines():
        if not raw.strip():
            continue
        line = orjson.loads(raw)
        at = datetime.fromisoformat(line["received_at"]) if "received_at" in line else RECEIVED
        outcome = mapper.map(line["topic"], payload_of(line), at)
        for r in outcome.records:
            env = r.envelope()
            out.append(
                {
                    "record": {
                        k: env[k] for k in ("id", "entity_type", "remote_id", "observed_at", "data")
                    }
                    | {"site": env["source"]["site"]}
                }
            )
        if outcome.quarantine is not None:
            q = outcome.quarantine
            out.append(
                {
                    "quarantine": {
                        "reason": q.reason,
                        "topic": q.context["topic"],
                        "problems": [p["reason"] for p in q.context["problems"]],
                    }
                }
            )
    out.append({"counters": dict(sorted(mapper.counters.items()))})
    return out


@pytest.mark.parametrize("name", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_golden_case(name: str) -> None:
    folder = CASES / name
    got = run_case(folder)
    expected_file = folder / "expected.jsonl"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        expected_file.write_bytes(b"".join(orjson.dumps(g) + b"\n" for g in got))
    expected = [orjson.loads(x) for x in expected_file.read_text().splitlines() if x.strip()]
    assert got == expected


def test_redelivery_gives_the_same_ids() -> None:
    got1 = run_case(CASES / "json_paths_scale")
    got2 = run_case(CASES / "json_paths_scale")
    assert got1 == got2


@pytest.mark.parametrize(
    ("pattern", "topic", "named"),
    [
        ("a/{x}/c", "a/b/c", {"x": "b"}),
        ("a/+/c", "a/b/c", {}),
        ("a/#", "a", {}),
        ("a/#", "a/b/c", {}),
        ("a/{x}/#", "a/b/c/d", {"x": "b"}),
        ("a/+", "a/b/c", None),
        ("a/b", "a/c", None),
        ("#", "$SYS/broker", None),
        ("+/x", "$SYS/x", None),
    ],
)
def test_topic_matching(pattern: str, topic: str, named: dict[str, str] | None) -> None:
    assert match_topic(pattern.split("/"), topic.split("/")) == named


def test_paths() -> None:
    doc = {"a": {"b": [10, {"c/d": 5, "e~f": 6}]}}
    assert lookup(doc, "a.b.0") == 10
    assert lookup(doc, "/a/b/1/c~1d") == 5
    assert lookup(doc, "/a/b/1/e~0f") == 6
    assert lookup(doc, "a.b.7") is MISSING
    assert lookup(doc, "a.x") is MISSING


def test_sparkplug_roundtrip_and_signed_types() -> None:
    metrics = [
        sparkplug.Metric(name="i8", datatype=sparkplug.INT8, value=-3),
        sparkplug.Metric(name="i64", datatype=sparkplug.INT64, value=-(2**40)),
        sparkplug.Metric(name="u32", datatype=sparkplug.UINT32, value=2**32 - 1),
        sparkplug.Metric(name="f", datatype=sparkplug.FLOAT, value=0.5),
        sparkplug.Metric(name="s", datatype=sparkplug.STRING, value="ü"),
        sparkplug.Metric(name="n", datatype=sparkplug.DOUBLE, is_null=True),
    ]
    decoded = sparkplug.decode(sparkplug.encode(sparkplug.Payload(1, 7, metrics)))
    assert decoded.seq == 7
    assert [m.value for m in decoded.metrics] == [-3, -(2**40), 2**32 - 1, 0.5, "ü", None]
    with pytest.raises(sparkplug.SparkplugError):
        sparkplug.decode(b"\x12\x10\x0a")


def test_sparkplug_aliases_survive_restart_through_the_cursor() -> None:
    config = MqttConfig.model_validate(
        tomllib.loads((CASES / "sparkplug_b" / "config.toml").read_text())
    )
    ref = SourceRef("plant", "mqtt", None)
    first = Mapper(ref, config)
    birth = sparkplug.Payload(
        1, 0, [sparkplug.Metric(name="Speed", alias=4, datatype=sparkplug.DOUBLE, value=1.0)]
    )
    outcome = first.map("spBv1.0/g/NBIRTH/n", sparkplug.encode(birth), RECEIVED)
    assert outcome.cursor is not None
    second = Mapper(ref, config)
    second.restore_aliases(orjson.loads(orjson.dumps(outcome.cursor.value)))
    data = sparkplug.Payload(
        2, 1, [sparkplug.Metric(alias=4, datatype=sparkplug.DOUBLE, value=2.0)]
    )
    again = second.map("spBv1.0/g/NDATA/n", sparkplug.encode(data), RECEIVED)
    assert again.quarantine is None
    assert [r.data["point"] for r in again.records] == ["Speed"]


def test_messages_and_bad_inputs_are_counted_per_subscription() -> None:
    config = MqttConfig.model_validate(
        {
            "type": "mqtt",
            "host": "127.0.0.1",
            "client_id": "count-test",
            "subscriptions": [
                {"topic": "site/{asset}/load", "points": [{"name": "load", "path": "kg"}]},
                {"topic": "site/{asset}/temp", "points": [{"name": "t", "path": "c"}]},
            ],
        }
    )
    mapper = Mapper(SourceRef("plant", "mqtt", "site-1"), config)
    now = datetime.now(UTC)
    for i in range(3):
        assert mapper.map(f"site/L{i}/load", b'{"kg": 1}', now).quarantine is None
    assert mapper.map("site/L1/load", b"not json", now).quarantine is not None
    assert mapper.map("other/topic", b"{}", now).quarantine is None  # matches no filter
    assert mapper.by_subscription == {"site/{asset}/load": [4, 1], "site/{asset}/temp": [0, 0]}
