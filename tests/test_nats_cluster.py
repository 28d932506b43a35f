"""Every record exactly once in a 3-replica JetStream stream, across a killed stream leader
and a SIGKILLed agent.

Three private nats-servers form a JetStream cluster on loopback cluster ports; the agent
(a real subprocess, tests/helpers/agentproc.py) reads N readings from a mosquitto through
its MQTT source and publishes them with the NATS sink into a stream with 3 replicas.
Mid-run the stream's leader is SIGKILLed (the other two elect a new one), and the agent is
SIGKILLed and started again. At the end the stream holds every reading once: as many
messages as distinct ``Nats-Msg-Id`` values (a record resent after its PubAck was lost is
a duplicate JetStream drops within its window), and every value.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import orjson
import pytest

from tests.helpers.agentproc import AgentProcess
from tests.helpers.mosquitto import Mosquitto, have_mosquitto
from tests.helpers.mqttpub import Publisher
from tests.helpers.natsserver import (
    cluster,
    have_nats_server,
    stream_messages,
    wait_stream_leader,
)
from tests.helpers.waiting import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not have_mosquitto(), reason="mosquitto not installed"),
    pytest.mark.skipif(not have_nats_server(), reason="nats-server not installed"),
]

N = 3000
ASSETS = 20
STREAM = "EDGECLUSTER"

CONFIG = """
[agent]
id = "gw-nats-cluster"
site = "s1"
state_dir = "{state}"

[logging]
level = "info"
format = "json"

[upstream]
type = "nats"
servers = [{servers}]
stream = "{stream}"
subject = "edge.{{site}}.{{entity_type}}"
create_stream = true
replicas = 3
duplicate_window = "2m"
batch_max_records = 200
backoff_initial = "50ms"
backoff_cap = "500ms"
connect_timeout = "2s"
ack_timeout = "3s"
drain_timeout = "1s"

[api]
enabled = false

[sources.plant]
type = "mqtt"
host = "127.0.0.1"
port = {source_port}
client_id = "agent-nats-cluster-source"
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


def stream(urls: list[str]) -> list[tuple[str, bytes]]:
    return asyncio.run(stream_messages(urls, STREAM))


def count(urls: list[str]) -> int:
    try:
        return len(stream(urls))
    except Exception:  # the cluster electing a leader: ask again
        return 0


def test_leader_killed_and_agent_sigkilled_every_record_once(tmp_path: Path) -> None:
    nodes = cluster(tmp_path / "nats", 3)
    source = Mosquitto(tmp_path / "source-broker")
    for node in nodes:
        node.start(wait=False)
    for node in nodes:
        wait_until(
            lambda n=node: (
                n.log_file.exists() and "Server is ready" in n.log_file.read_text(errors="replace")
            ),
            f"{node.name} up",
            30,
        )
    source.start()
    urls = [n.url for n in nodes]
    conf = tmp_path / "config.toml"
    conf.write_text(
        CONFIG.format(
            state=tmp_path / "state",
            servers=", ".join(json.dumps(u) for u in urls),
            stream=STREAM,
            source_port=source.port,
        )
    )
    agent = AgentProcess(conf, tmp_path / "agent.log")
    publishing: threading.Thread | None = None
    try:
        agent.start()
        wait_until(lambda: "mqtt_subscribed" in agent.log(), "source subscribed", 60)

        def publish() -> None:
            with Publisher(source.port) as pub:
                pub.publish_many(
                    [
                        (f"t/A{k % ASSETS}", json.dumps({"ts": 1_700_000_000 + k, "v": k}))
                        for k in range(N)
                    ]
                )

        publishing = threading.Thread(target=publish)
        publishing.start()

        wait_until(lambda: count(urls) >= N // 5, "a fifth in the stream", 120)
        leader = asyncio.run(wait_stream_leader(urls, STREAM))
        killed = next(n for n in nodes if n.name == leader)
        killed.kill()  # the other two elect a new leader; publishes in flight time out
        alive = [n.url for n in nodes if n is not killed]

        wait_until(lambda: count(alive) >= N // 2, "half in the stream", 120)
        agent.check_alive()
        agent.kill()
        agent.start()

        publishing.join(120)
        wait_until(
            lambda: count(alive) >= N,
            "every reading in the stream",
            120,
            detail=lambda: f"{count(alive)} of {N}; agent log: {agent.tail(5)}",
        )
        agent.check_alive()
        msgs = stream(alive)
        retries = agent.count("upstream_retry") + agent.count("nats_publish_incomplete")
    finally:
        agent.kill()
        if publishing is not None:
            publishing.join(60)
        source.stop()
        for node in nodes:
            node.stop()
    ids = [mid for mid, _ in msgs]
    got = sorted(int(orjson.loads(body)["data"]["value"]) for _, body in msgs)
    print(
        f"nats cluster: {N} readings, {len(msgs)} messages, {len(set(ids))} distinct ids, "
        f"{retries} failed sends retried (leader {leader} killed, agent SIGKILLed)"
    )
    assert len(set(ids)) == len(ids), "a record is in the stream twice"
    assert got == list(range(N)), "a reading is missing (or there twice)"
