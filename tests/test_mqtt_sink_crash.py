"""The MQTT sink loses nothing across a SIGKILL of the agent and a restart of its broker.

The real agent runs as a subprocess (tests/helpers/agentproc.py): an MQTT source reads N
readings from one mosquitto, the MQTT sink publishes them (JSON batches, QoS 1) to a
second one, where a subscriber with a persistent session collects them. Mid-run the agent
is SIGKILLed and started again, and later the sink's broker is restarted. Every reading
must reach the subscriber; the records published twice (sent, not yet acknowledged in the
outbox when the agent died or the connection dropped) are counted, never lost.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import orjson
import pytest

from tests.helpers.agentproc import AgentProcess
from tests.helpers.mosquitto import Mosquitto, have_mosquitto
from tests.helpers.mqttpub import Publisher
from tests.helpers.mqttsub import Subscriber
from tests.helpers.waiting import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not have_mosquitto(), reason="mosquitto not installed"),
]

N = 6000
ASSETS = 10

CONFIG = """
[agent]
id = "gw-sink-crash"
site = "s1"
state_dir = "{state}"

[logging]
level = "info"
format = "json"

[upstream]
type = "mqtt"
host = "127.0.0.1"
port = {sink_port}
tls = false
client_id = "agent-sink-crash"
payload = "batch"
topic = "edge/{{site}}/{{asset}}"
batch_max_records = 100
backoff_initial = "50ms"
backoff_cap = "500ms"
connect_timeout = "2s"
ack_timeout = "10s"
drain_timeout = "1s"

[api]
enabled = false

[sources.plant]
type = "mqtt"
host = "127.0.0.1"
port = {source_port}
client_id = "agent-sink-crash-source"
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


def values(sub: Subscriber) -> Counter[int]:
    """How often each published value arrived (one reading per published message)."""
    got: Counter[int] = Counter()
    for message in sub.received():
        for record in orjson.loads(message.payload)["records"]:
            got[int(record["data"]["value"])] += 1
    return got


def test_sigkill_and_broker_restart_lose_nothing(tmp_path: Path) -> None:
    source = Mosquitto(tmp_path / "source-broker")
    sink = Mosquitto(tmp_path / "sink-broker")
    source.start()
    sink.start()
    conf = tmp_path / "config.toml"
    conf.write_text(
        CONFIG.format(state=tmp_path / "state", sink_port=sink.port, source_port=source.port)
    )
    agent = AgentProcess(conf, tmp_path / "agent.log")
    sub = Subscriber(sink.port, "edge/#", client_id="crash-subscriber")
    publishing: threading.Thread | None = None
    try:
        agent.start()
        wait_until(lambda: "mqtt_subscribed" in agent.log(), "source subscribed", 60)

        def publish() -> None:
            with Publisher(source.port) as pub:
                items = [
                    (f"t/A{k % ASSETS}", json.dumps({"ts": 1_700_000_000 + k, "v": k}))
                    for k in range(N)
                ]
                pub.publish_many(items)

        publishing = threading.Thread(target=publish)
        publishing.start()

        wait_until(lambda: sum(values(sub).values()) >= N // 6, "a sixth delivered", 120)
        agent.check_alive()
        agent.kill()
        at_kill = len(values(sub))
        agent.start()

        wait_until(lambda: len(values(sub)) >= N // 2, "half delivered", 120)
        at_restart = len(values(sub))
        sink.restart()  # graceful: the subscriber's session and its queue are kept

        publishing.join(120)
        wait_until(
            lambda: len(values(sub)) == N,
            "every reading at the subscriber",
            180,
            detail=lambda: f"{len(values(sub))} of {N}; agent log: {agent.tail(5)}",
        )
        agent.check_alive()
    finally:
        agent.kill()
        if publishing is not None:
            publishing.join(60)
        sub.close()
        sink.stop()
        source.stop()
    got = values(sub)
    lost = sorted(set(range(N)) - set(got))
    duplicates = sum(got.values()) - len(got)
    print(
        f"mqtt sink crash: {N} readings, lost {len(lost)}, duplicates {duplicates}, "
        f"distinct at the kill {at_kill}, at the broker restart {at_restart}"
    )
    assert lost == []
    assert set(got) == set(range(N))
