"""Rules across SIGKILL: the agent (subprocess, real supervisor) raises a rule, is killed
after the commit but before the PUBACK, restarts and gets the message again. The rule's
state came back from the outbox, so the redelivered fault raises nothing new: one rule
event, one maintenance request."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import orjson
import pytest

from agent.sources.mqtt.source import TEST_HOLD_ACKS_ENV
from tests.helpers.agentproc import AgentProcess, outbox_rows
from tests.helpers.mosquitto import Mosquitto
from tests.helpers.mqttpub import Publisher
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow

CONFIG = """
[agent]
id = "gw-test"
site = "s1"
state_dir = "{state}"

[logging]
format = "json"

[upstream]
url = "https://upstream.invalid"

[api]
enabled = false

[sources.lifts]
type = "mqtt"
host = "127.0.0.1"
port = {port}
client_id = "agent-rules-crash"
reconnect_initial = "100ms"
reconnect_cap = "1s"

[[sources.lifts.subscriptions]]
topic = "site/{{site}}/lift/{{asset}}/state"
profile = "lift_generic"
asset = "{{asset}}"
site = "{{site}}"
timestamp_path = "ts"

[[sources.lifts.rules]]
name = "door_fault"
type = "state"
point = "fault"
values = ["door_fault", "door_lock_fault"]
maintenance_request = {{ title = "Door fault on {{asset}}" }}
"""


def kinds(db: Path) -> Counter[tuple[str, str, str]]:
    out: Counter[tuple[str, str, str]] = Counter()
    for rid, body in outbox_rows(db):
        env = orjson.loads(body)
        if env["entity_type"] == "maintenance_request" or env["data"].get("rule"):
            out[(env["entity_type"], env["remote_id"], rid)] += 1
    return out


def fault_rows(db: Path) -> int:
    """Fault readings (not the rule events, which name the same point)."""
    envs = [orjson.loads(body) for _, body in outbox_rows(db)]
    return sum(1 for e in envs if e["data"].get("point") == "fault" and "rule" not in e["data"])


def test_kill_after_rule_commit_redelivery_raises_nothing_new(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    db = tmp_path / "state" / "outbox.db"
    conf = tmp_path / "config.toml"
    conf.write_text(CONFIG.format(state=tmp_path / "state", port=mosquitto.port))
    agent = AgentProcess(conf, tmp_path / "agent.log", **{TEST_HOLD_ACKS_ENV: "1"})
    agent.start()
    try:
        wait_until(lambda: "mqtt_subscribed" in agent.log(), what="subscribed")
        with Publisher(mosquitto.port) as pub:
            pub.publish("site/b/lift/L1/state", json.dumps({"ts": 1790000000, "fault": 2}))
        wait_until(lambda: len(kinds(db)) == 2, what="rule event and request committed")
        agent.kill()  # committed, never acknowledged: the broker redelivers
        agent.env = {}
        agent.start()
        wait_until(lambda: fault_rows(db) == 2, what="fault redelivered and stored again")
        agent.check_alive()
    finally:
        agent.kill()
    got = kinds(db)
    assert sorted((k[0], k[1]) for k in got) == [
        ("event", "L1/rule/door_fault"),
        ("maintenance_request", "L1/door_fault/20260921T141320.000000Z"),
    ]
    assert all(n == 1 for n in got.values())
    loaded = [e for e in _events(agent.log()) if e.get("event") == "rules_loaded"]
    assert [e["raised"] for e in loaded] == [0, 1]  # the restart knew the rule was raised


def _events(text: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
