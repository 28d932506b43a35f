"""MQTT ingest: messages/s the MQTT source commits to the outbox, against a bare subscriber.

Both consumers drain the same number of QoS 1 JSON messages that a publisher queued in
their persistent sessions on a private mosquitto (so the publisher's speed does not
matter). Figure: the agent's MQTT source (map, commit to a real outbox with
synchronous=FULL, acknowledge after commit). Ceiling: a bare aiomqtt subscriber (same
client library, acknowledges on receipt) that only counts. Zero loss is checked: every
message's record id must be in the outbox, in every round.

Rounds (``--rounds``, default 3) alternate ceiling and agent on fresh messages and the
fastest of each counts: a single run of a second or less is at the mercy of whatever
else the machine does, and that should not decide the ratio.

    python benchmarks/mqtt_ingest.py [--quick] [--messages N] [--rounds R]

Last line: JSON with benchmark, value, unit, ceiling, ratio (target ratio >= 0.7).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiomqtt
import structlog

from agent.health import State
from agent.outbox import Outbox
from agent.pipeline import Pipeline
from agent.records import SourceRef
from agent.sources.base import SourceContext
from agent.sources.mqtt import MqttConfig, MqttSource
from agent.sources.mqtt.mapping import Mapper
from tests.helpers.mosquitto import Mosquitto
from tests.helpers.mqttpub import Publisher

ASSETS = 10
TS0 = 1_790_000_000


def topic(i: int) -> str:
    return f"bench/A{i % ASSETS}"


def payload(i: int) -> bytes:  # i: global message number, unique across rounds
    return json.dumps({"ts": TS0 + i, "v": i * 0.5, "q": "good"}).encode()


def preload(port: int, first: int, n: int) -> None:
    with Publisher(port) as pub:
        pub.publish_many((topic(i), payload(i)) for i in range(first, first + n))


async def create_session(port: int, client_id: str) -> None:
    """Connect once so the broker holds a session with the subscription, then leave."""
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=session_props(),
    ) as c:
        await c.subscribe("bench/+", qos=1)


def session_props() -> object:
    from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415
    from paho.mqtt.properties import Properties  # noqa: PLC0415

    p = Properties(PacketTypes.CONNECT)
    p.SessionExpiryInterval = 3600
    p.ReceiveMaximum = 1000
    return p


async def bare(port: int, n: int) -> float:
    """Ceiling: receive n queued messages and count them (auto-ack on receipt)."""
    count = 0
    t0 = time.perf_counter()
    c = aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier="bench-bare",
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=session_props(),
    )
    c._client.disable_logger()  # the agent does the same; keep the comparison fair
    async with c:
        await c.subscribe("bench/+", qos=1)
        # Same receive path as the agent: first message through the iterator, whatever is
        # already queued straight from aiomqtt's queue.
        queue = c._queue
        messages = c.messages
        while count < n:
            await anext(messages)
            count += 1
            while not queue.empty():
                queue.get_nowait()
                count += 1
    return n / (time.perf_counter() - t0)


def agent_config(port: int) -> MqttConfig:
    return MqttConfig.model_validate(
        {
            "type": "mqtt",
            "host": "127.0.0.1",
            "port": port,
            "client_id": "bench-agent",
            "subscriptions": [
                {
                    "topic": "bench/{asset}",
                    "asset": "{asset}",
                    "timestamp_path": "ts",
                    "points": [{"name": "v", "path": "v", "quality_path": "q", "unit": "kWh"}],
                }
            ],
        }
    )


async def agent(port: int, n: int, db: Path) -> float:
    """Figure: the MQTT source commits n queued messages to a real outbox, through the
    pipeline the supervisor hands it (no rules, as configured here)."""
    src = MqttSource("bench", agent_config(port), SourceContext("gw", "s1"))
    async with Outbox(db) as box:
        t0 = time.perf_counter()
        task = asyncio.create_task(src.run(Pipeline(box, on_commit=lambda _r, _q: None)))
        while src.counters["committed_messages"] < n:
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - t0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return n / elapsed


def lost(db: Path, first: int, n: int) -> int:
    # The ids the source must have stored, from the source's own mapper (the messages
    # carry their time, so the arrival time given here does not matter).
    mapper = Mapper(SourceRef("bench", "mqtt", "s1"), agent_config(1883))
    now = datetime.now(UTC)
    want = {
        rec.id
        for i in range(first, first + n)
        for rec in mapper.map(topic(i), payload(i), now).records
    }
    con = sqlite3.connect(db)
    try:
        have = {r[0] for r in con.execute("SELECT id FROM records")}
    finally:
        con.close()
    return len(want - have)


async def main_async(n: int, rounds: int, work: Path) -> dict[str, object]:
    broker = Mosquitto(work / "broker", max_inflight=1000)
    broker.start()
    ceilings: list[float] = []
    values: list[float] = []
    missing = 0
    try:
        await create_session(broker.port, "bench-bare")
        agent_src = MqttSource("bench", agent_config(broker.port), SourceContext("gw", "s1"))
        async with Outbox(work / "warm.db") as box:  # creates the agent's session
            task = asyncio.create_task(agent_src.run(Pipeline(box)))
            while agent_src.tracker.state is not State.OK:  # noqa: ASYNC110 - plain attribute
                await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for r in range(rounds):
            # Both sessions get the same n fresh messages; each round its own outbox.
            await asyncio.to_thread(preload, broker.port, r * n, n)
            ceilings.append(await bare(broker.port, n))
            db = work / f"outbox-{r}.db"
            values.append(await agent(broker.port, n, db))
            missing += lost(db, r * n, n)
    finally:
        broker.stop()
    value, ceiling = max(values), max(ceilings)
    return {
        "benchmark": "mqtt_ingest",
        "value": round(value, 1),
        "unit": "messages/s",
        "ceiling": round(ceiling, 1),
        "ratio": round(value / ceiling, 3),
        "messages": n,
        "rounds": rounds,
        "values": [round(v) for v in values],
        "ceilings": [round(c) for c in ceilings],
        "lost": missing,
        "target_ratio": 0.7,
        "ceiling_is": "bare aiomqtt subscriber counting QoS 1 messages "
        "(ack on receipt, same queue drain)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (< 30 s)")
    parser.add_argument("--messages", type=int, default=None, help="per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternated; best of each counts")
    args = parser.parse_args()
    n = args.messages or (10_000 if args.quick else 50_000)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(main_async(n, args.rounds, Path(tmp)))
    print(json.dumps(result))
    if result["lost"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
