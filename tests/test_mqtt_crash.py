"""No loss across SIGKILL: the agent runs as a subprocess and is killed mid-flight.

The forwarder and receiver are built separately, so these tests read the outbox file
directly (sqlite3: ``records.id``). The property: every published message is in the
outbox after the restart, and after dedupe-by-id there is exactly one record per message
(a redelivery of a committed but unacknowledged message stores the same id again, which
the upstream drops).
"""

from __future__ import annotations

import json
import threading
import tomllib
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.records import SourceRef
from agent.sources.mqtt import MqttConfig
from agent.sources.mqtt.mapping import Mapper
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
level = "info"
format = "json"

[outbox]
max_bytes = {max_bytes}
when_full = "block"

[upstream]
url = "https://upstream.invalid"

[api]
enabled = false

[sources.plant]
type = "mqtt"
host = "127.0.0.1"
port = {port}
protocol = "{protocol}"
client_id = "agent-crash-test"
reconnect_initial = "100ms"
reconnect_cap = "1s"

[[sources.plant.subscriptions]]
topic = "t/{{asset}}"
asset = "{{asset}}"
timestamp_path = "ts"

[[sources.plant.subscriptions.points]]
name = "v"
path = "v"
"""


def write_config(tmp: Path, port: int, protocol: str, max_bytes: int) -> Path:
    path = tmp / "config.toml"
    text = CONFIG.format(state=tmp / "state", max_bytes=max_bytes, port=port, protocol=protocol)
    path.write_text(text)
    return path


MAPPER = Mapper(
    SourceRef("plant", "mqtt", "s1"),
    MqttConfig.model_validate(tomllib.loads(CONFIG.format(state="", max_bytes=1, port=1883,
                                                          protocol="5"))["sources"]["plant"]),
)  # fmt: skip


def expected_id(asset: str, ts: int) -> str:
    """The deterministic id the agent gives the reading of message (asset, ts), from the
    agent's own mapper with this file's config (the id covers the value too)."""
    now = datetime.now(UTC)  # not used: the message carries its time
    (record,) = MAPPER.map(f"t/{asset}", message(asset, ts).encode(), now).records
    return record.id


def ids(db: Path) -> Counter[str]:
    return Counter(r[0] for r in outbox_rows(db, "SELECT id FROM records"))


def message(asset: str, ts: int) -> str:
    return json.dumps({"ts": ts, "v": ts * 1.5})


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_kill_while_commit_blocked_then_redelivered(
    mosquitto: Mosquitto, tmp_path: Path, protocol: str
) -> None:
    db = tmp_path / "state" / "outbox.db"
    # A 1-byte budget: the first append is admitted (empty outbox), every later one blocks,
    # so message B is received but cannot be committed: the window is deterministic.
    conf = write_config(tmp_path, mosquitto.port, protocol, max_bytes=1)
    agent = AgentProcess(conf, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(lambda: "mqtt_subscribed" in agent.log(), what="subscribed")
        with Publisher(mosquitto.port, protocol) as pub:
            pub.publish("t/A", message("A", 1000))
            wait_until(lambda: expected_id("A", 1000) in ids(db), what="A committed")
            pub.publish("t/B", message("B", 2000))
            wait_until(lambda: "outbox_full_backpressure" in agent.log(), what="B blocked")
        agent.check_alive()
        agent.kill()
        assert expected_id("B", 2000) not in ids(db)

        write_config(tmp_path, mosquitto.port, protocol, max_bytes=1 << 20)
        agent.start()
        wait_until(lambda: expected_id("B", 2000) in ids(db), what="B redelivered")
    finally:
        agent.kill()
    got = ids(db)
    # A was acknowledged after its commit: not redelivered. B: redelivered, stored once.
    assert got == Counter({expected_id("A", 1000): 1, expected_id("B", 2000): 1})


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_kill_after_commit_before_ack_redelivers_same_id(
    mosquitto: Mosquitto, tmp_path: Path, protocol: str
) -> None:
    db = tmp_path / "state" / "outbox.db"
    conf = write_config(tmp_path, mosquitto.port, protocol, max_bytes=1 << 20)
    # Test-only hook: commit but never acknowledge, i.e. a crash right after the commit.
    agent = AgentProcess(conf, tmp_path / "agent.log", **{TEST_HOLD_ACKS_ENV: "1"})
    agent.start()
    try:
        wait_until(lambda: "mqtt_subscribed" in agent.log(), what="subscribed")
        with Publisher(mosquitto.port, protocol) as pub:
            pub.publish("t/C", message("C", 3000))
        wait_until(lambda: ids(db)[expected_id("C", 3000)] == 1, what="C committed")
        agent.kill()
        agent.env = {}
        agent.start()
        wait_until(lambda: ids(db)[expected_id("C", 3000)] == 2, what="C redelivered")
    finally:
        agent.kill()
    got = ids(db)
    assert set(got) == {expected_id("C", 3000)}  # one message id after dedupe-by-id


def test_kill_mid_stream_loses_nothing(mosquitto: Mosquitto, tmp_path: Path) -> None:
    db = tmp_path / "state" / "outbox.db"
    conf = write_config(tmp_path, mosquitto.port, "5", max_bytes=1 << 30)
    agent = AgentProcess(conf, tmp_path / "agent.log")
    total = 400
    sent = [expected_id(f"P{i % 7}", 10_000 + i) for i in range(total)]
    agent.start()
    try:
        wait_until(lambda: "mqtt_subscribed" in agent.log(), what="subscribed")

        def publish() -> None:
            with Publisher(mosquitto.port) as pub:
                pub.publish_many(
                    (f"t/P{i % 7}", message(f"P{i % 7}", 10_000 + i)) for i in range(total)
                )

        thread = threading.Thread(target=publish)
        thread.start()
        wait_until(lambda: len(ids(db)) >= 50, what="some committed")
        agent.kill()
        thread.join()
        agent.start()
        wait_until(lambda: set(sent) <= set(ids(db)), timeout=60, what="all committed")
    finally:
        agent.kill()
    assert set(ids(db)) == set(sent)
