"""max_held_bytes: memory stays bounded while commits wait, and nothing goes silently.

A real private mosquitto and a real outbox that is full (``when_full = "block"``, no
forwarder draining it), so every commit after the first waits, as on a site whose WAN
has been down long enough to fill the outbox budget.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.api import AgentCollector
from agent.outbox import Outbox
from agent.sources.mqtt import MqttSource
from tests.helpers.mosquitto import Mosquitto
from tests.helpers.mqttpub import Publisher
from tests.helpers.waiting import wait_for as until
from tests.mqtt_support import mqtt_config, outbox, records, running

CAP = 20 * 1024
TOPIC = "site/berlin/lift/L{}/telemetry"


def _config(port: int, receive_maximum: int = 65535) -> Any:
    return mqtt_config(
        port,
        protocol="5",
        receive_maximum=receive_maximum,
        max_payload_bytes="1KiB",
        max_held_bytes=CAP,
        batch_max_messages=10,
    )


def _payload(i: int, pad: int) -> str:
    return json.dumps({"ts": 1790000000 + i, "load": {"kg": i}, "pad": "x" * pad})


async def _fill(box: Outbox, pub: Publisher, src: MqttSource) -> None:
    """One message committed: the outbox (max_bytes=1) is full from now on."""
    pub.publish(TOPIC.format(0), _payload(0, 0), qos=1)
    await until(lambda: src.counters["committed_messages"] >= 1, what="first commit")


def test_max_held_bytes_must_fit_one_payload() -> None:
    with pytest.raises(ValueError, match="max_held_bytes must be at least max_payload_bytes"):
        mqtt_config(1883, max_payload_bytes="1MiB", max_held_bytes="512KiB")


async def test_qos0_beyond_the_limit_is_dropped_and_counted(mosquitto: Mosquitto, tmp_path) -> None:
    async with (
        outbox(tmp_path, max_bytes=1, when_full="block") as box,
        running(_config(mosquitto.port), box) as src,
    ):
        with Publisher(mosquitto.port, "5") as pub:
            await _fill(box, pub, src)
            n = pub.publish_many(
                ((TOPIC.format(i % 5), _payload(i, 100)) for i in range(1, 601)), qos=0
            )
            await until(lambda: src.counters["received"] >= n + 1, what="all QoS 0 received")
        status = src.status()
        held = status["held_messages"]
        dropped = src.counters["dropped_qos0_over_held_limit"]
        # bounded: what is held stays under the limit, and the rest was dropped...
        assert 0 < status["held_bytes"] <= CAP
        assert dropped > 0
        assert 0 < held * 300 <= CAP  # ~300 bytes each with topic and bookkeeping
        # ...and every message is accounted for: committed, held, or counted as dropped
        assert src.counters["committed_messages"] + held + dropped == n + 1
        assert src.counters["connects"] == 1
        # monitoring sees the loss too (/metrics)
        families = {m.name: m for m in AgentCollector._sources({"plant": src.status()})}
        (sample,) = families["edge_agent_source_inputs_dropped"].samples
        assert sample.labels == {"source": "plant", "reason": "qos0_over_held_limit"}
        assert sample.value == dropped
        # the WAN comes back (the outbox has room again, as after a drain): what was held
        # is committed, and nothing more is dropped
        box.max_bytes = 1 << 30
        box._freed()
        await until(
            lambda: src.counters["committed_messages"] == n + 1 - dropped, what="held committed"
        )
        assert src.counters["dropped_qos0_over_held_limit"] == dropped
        assert src.status()["held_bytes"] == 0


async def test_qos1_beyond_the_limit_is_kept_and_bounded_by_the_broker(
    mosquitto: Mosquitto, tmp_path
) -> None:
    """QoS 1 is never dropped: the broker's flow control bounds it (receive maximum 100:
    about 53 KiB here, over the 20 KiB limit), and the agent warns that the limit is too
    small for that."""
    n, window = 200, 100
    async with (
        outbox(tmp_path, max_bytes=1, when_full="block") as box,
        running(_config(mosquitto.port, receive_maximum=window), box) as src,
    ):
        with Publisher(mosquitto.port, "5") as pub:
            await _fill(box, pub, src)
            with capture_logs() as logs:
                pub.publish_many(
                    ((TOPIC.format(i % 5), _payload(i, 400)) for i in range(1, n + 1)), qos=1
                )
                await until(
                    lambda: src.status()["held_messages"] >= window,
                    what="the broker's in-flight window held",
                )
                await asyncio.sleep(0.5)  # the broker sends no more while none is acked
            status = src.status()
            assert status["held_messages"] == window
            assert status["held_bytes"] > CAP
            assert src.counters["qos1_held_over_limit"] > 0
            assert src.counters["dropped_qos0_over_held_limit"] == 0
            assert [e["event"] for e in logs].count("mqtt_held_over_limit") == 1
            # The WAN comes back (the outbox has room again, as after a drain).
            box.max_bytes = 1 << 30
            box._freed()
            got = await until(lambda: _values_if_all(box, n), what="every QoS 1 message")
        assert src.counters["connects"] == 1
    assert got == set(range(n + 1))


async def _values_if_all(box: Outbox, n: int) -> set[int] | None:
    values = {int(r["data"]["value"]) for r in await records(box) if r["data"]["point"] == "load"}
    return values if len(values) == n + 1 else None
