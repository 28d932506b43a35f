"""max_held_bytes: memory stays bounded while commits wait, for every QoS, and nothing goes
silently.

A real private mosquitto and a real outbox that is full (``when_full = "block"``, no
forwarder draining it), so every commit after the first waits, as on a site whose WAN
has been down long enough to fill the outbox budget. At ``max_held_bytes`` the source
stops reading (agent/sources/mqtt/client.py); the broker queues the rest.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme
from structlog.testing import capture_logs

from agent.api import AgentCollector
from agent.outbox import Outbox
from agent.sources.mqtt import MqttSource
from tests.helpers.mosquitto import Mosquitto, Tls, have_mosquitto
from tests.helpers.mqttpub import Publisher
from tests.helpers.rss import MIB, RssPeak
from tests.helpers.waiting import wait_for as until
from tests.mqtt_support import mqtt_config, outbox, records, running

CAP = 20 * 1024
TOPIC = "site/berlin/lift/L{}/telemetry"


def _config(port: int, **over: Any) -> Any:
    data: dict[str, Any] = {
        "protocol": "5",
        "max_payload_bytes": "1KiB",
        "max_held_bytes": CAP,
        "batch_max_messages": 10,
        "keepalive": 1,
    }
    data.update(over)
    return mqtt_config(port, **data)


def _payload(i: int, pad: int) -> str:
    return json.dumps({"ts": 1790000000 + i, "load": {"kg": i}, "pad": "x" * pad})


async def _fill(pub: Publisher, src: MqttSource) -> None:
    """One message committed: the outbox (max_bytes=1) is full from now on."""
    pub.publish(TOPIC.format(0), _payload(0, 0), qos=1)
    await until(lambda: src.counters["committed_messages"] >= 1, what="first commit")


def _free(box: Outbox) -> None:
    """The WAN comes back: the outbox has room again, as after a drain."""
    box.max_bytes = 1 << 40
    box._freed()


async def _values_if_all(box: Outbox, n: int) -> set[int] | None:
    values = {int(r["data"]["value"]) for r in await records(box) if r["data"]["point"] == "load"}
    return values if len(values) == n + 1 else None


_PUBLISH = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from tests.helpers.mqttpub import Publisher
port, n, pad = map(int, sys.argv[1:])
with Publisher(port, "5") as pub:
    for i in range(1, n + 1):  # one at a time: the publisher holds one message
        pub.publish("{TOPIC}".format(i % 5), json.dumps(
            {{"ts": 1790000000 + i, "load": {{"kg": i}}, "pad": "x" * pad}}))
"""


def _pings(broker: Mosquitto) -> int:
    return broker.log_file.read_text(errors="replace").count("Received PINGREQ from agent-test")


def test_max_held_bytes_must_fit_one_payload() -> None:
    with pytest.raises(ValueError, match="max_held_bytes must be at least max_payload_bytes"):
        mqtt_config(1883, max_payload_bytes="1MiB", max_held_bytes="512KiB")


def test_max_packet_bytes_leaves_room_to_quarantine() -> None:
    assert mqtt_config(1883).packet_limit == 4 * 256 * 1024 + 64 * 1024
    assert mqtt_config(1883, max_packet_bytes="2MiB").packet_limit == 2 * MIB
    with pytest.raises(ValueError, match="max_packet_bytes must be larger than max_payload"):
        mqtt_config(1883, max_payload_bytes="1MiB", max_packet_bytes="1MiB")


async def test_qos1_at_the_limit_pauses_reading_keeps_the_connection_and_loses_nothing(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The broker's window (receive maximum 1000, ~450 KiB here) is far above the 20 KiB
    cap: reading pauses at the cap, the connection outlives many keepalives while paused
    (the agent pings; paho's own check would close it after two), and once the outbox
    frees up every message is committed, on the same connection."""
    n = 1000
    async with (
        outbox(tmp_path, max_bytes=1, when_full="block") as box,
        running(_config(mosquitto.port), box) as src,
    ):
        with Publisher(mosquitto.port, "5") as pub:
            await _fill(pub, src)
            with capture_logs() as logs:
                pub.publish_many(
                    ((TOPIC.format(i % 5), _payload(i, 400)) for i in range(1, n + 1)), qos=1
                )
                await until(lambda: src.status()["reading_paused"], what="reading paused")
                pings = _pings(mosquitto)
                # paused across 5 keepalives: only the agent's pings keep the connection
                await until(lambda: _pings(mosquitto) >= pings + 10, what="pings while paused")
            status = src.status()
            assert status["reading_paused"] is True
            assert status["connected"] is True
            assert src.counters["connects"] == 1
            assert CAP <= status["held_bytes"] <= CAP + 700  # one ~650-byte message over
            assert src.counters["dropped_qos0_over_held_limit"] == 0
            assert src.counters["acked"] == 1  # nothing acknowledged before its commit
            assert [e["event"] for e in logs].count("mqtt_reading_paused") == 1
            _free(box)
            got = await until(lambda: _values_if_all(box, n), what="every QoS 1 message")
        assert got == set(range(n + 1))
        assert src.counters["connects"] == 1
        assert src.counters["read_pauses"] >= 1
        await until(lambda: src.counters["acked"] == n + 1, what="every message acknowledged")
        assert src.status()["held_bytes"] == 0
        assert src.status()["reading_paused"] is False


async def test_qos0_at_the_limit_is_left_to_the_broker_and_every_loss_is_counted(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """QoS 0: the agent pauses too, and the broker queues for the connected client (up
    to its own limits, which it logs when it drops): here every message comes through
    once the outbox frees up. Before the pause, the agent dropped ~90% of them."""
    n = 600
    async with (
        outbox(tmp_path, max_bytes=1, when_full="block") as box,
        running(_config(mosquitto.port), box) as src,
    ):
        with Publisher(mosquitto.port, "5") as pub:
            await _fill(pub, src)
            pub.publish_many(((TOPIC.format(i % 5), _payload(i, 100)) for i in range(1, n + 1)), 0)
            await until(lambda: src.status()["reading_paused"], what="reading paused")
            status = src.status()
            assert CAP <= status["held_bytes"] <= CAP + 400
            held = status["held_messages"]
            assert src.counters["committed_messages"] + held == src.counters["received"]
            _free(box)
            got = await until(lambda: _values_if_all(box, n), what="every QoS 0 message")
        assert got == set(range(n + 1))
        assert src.counters["dropped_qos0_over_held_limit"] == 0
        assert src.counters["connects"] == 1


async def test_a_message_read_while_at_the_limit_qos0_dropped_and_counted_qos1_kept() -> None:
    """Reading is paused at the limit, so only bytes already read (TLS decrypts a record
    at a time) can arrive then: QoS 0 is dropped and counted, QoS 1 kept (dropping it
    unacknowledged would stall the broker's window until a reconnect)."""
    from agent.sources.base import SourceContext  # noqa: PLC0415
    from agent.sources.mqtt.source import _Pipe  # noqa: PLC0415

    src = MqttSource("plant", _config(1883), SourceContext(agent_id="gw", site="s"))
    pipe = _Pipe(held=CAP)
    src._on_message(pipe, TOPIC.format(1).encode(), _payload(1, 10).encode(), 0, 0)
    src._on_message(pipe, TOPIC.format(2).encode(), _payload(2, 10).encode(), 5, 1)
    assert src.counters["dropped_qos0_over_held_limit"] == 1
    assert src.counters["qos1_held_over_limit"] == 1
    (batch,) = pipe.batches
    assert batch.acks == [(5, 1)]
    # monitoring sees the loss (/metrics)
    families = {m.name: m for m in AgentCollector._sources({"plant": src.status()})}
    (sample,) = families["edge_agent_source_inputs_dropped"].samples
    assert sample.labels == {"source": "plant", "reason": "qos0_over_held_limit"}
    assert sample.value == 1


async def test_large_qos1_messages_while_the_outbox_is_full_stay_within_the_bound(
    tmp_path: Path,
) -> None:
    """The case that held 419 MB and rising: 1000 QoS 1 messages of 200 KiB (200 MB) with
    the outbox full, a broker window of 1000 (mosquitto's max_inflight 0: unlimited).
    Bound: max_held_bytes (8 MiB) + one message, plus the first batch mapped and waiting
    in the outbox append, paho's packet buffer and the allocator's slack: 48 MiB."""
    if not have_mosquitto():
        pytest.skip("mosquitto is not installed")
    broker = Mosquitto(tmp_path / "broker", max_inflight=0)
    broker.start()
    n, pad, cap = 1000, 200 * 1024, 8 * MIB
    conf = _config(broker.port, max_payload_bytes="256KiB", max_held_bytes=cap, keepalive=30)
    try:
        async with (
            outbox(tmp_path, max_bytes=1, when_full="block") as box,
            running(conf, box) as src,
        ):
            with Publisher(broker.port, "5") as pub:
                await _fill(pub, src)
                with RssPeak() as rss:
                    # from another process: the publisher's own buffers (200 MB queued
                    # in paho) must not count as the agent's memory
                    publisher = await asyncio.create_subprocess_exec(
                        sys.executable, "-c", _PUBLISH, str(broker.port), str(n), str(pad)
                    )
                    assert await publisher.wait() == 0
                    await until(lambda: src.status()["reading_paused"], what="reading paused")
                    held = src.status()["held_bytes"]
                print("large QoS 1:", rss.describe(), f"held {held / MIB:.1f} MiB")  # -s
                assert held <= cap + pad + 1024
                assert rss.growth <= 48 * MIB, rss.describe()
                _free(box)
                got = await until(
                    lambda: _values_if_all(box, n), timeout=120, what="every message committed"
                )
        assert got == set(range(n + 1))
        assert src.counters["connects"] == 1
    finally:
        broker.stop()


async def test_a_message_over_max_packet_bytes_is_dropped_by_the_broker_not_held(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """MQTT 5 Maximum Packet Size: a message between max_payload_bytes and
    max_packet_bytes is quarantined (visible); a larger one never reaches the agent (the
    broker drops it for this client), and the session goes on."""
    conf = _config(mosquitto.port, max_held_bytes="64KiB", max_packet_bytes="8KiB")
    async with outbox(tmp_path) as box, running(conf, box) as src:
        with Publisher(mosquitto.port, "5") as pub:
            pub.publish(TOPIC.format(1), _payload(1, 4000), qos=1)  # 4 KiB: quarantined
            pub.publish(TOPIC.format(2), _payload(2, 20_000), qos=1)  # 20 KiB: broker drops
            pub.publish(TOPIC.format(3), _payload(3, 10), qos=1)
            await until(lambda: src.counters["committed_messages"] >= 2, what="two committed")
            got = await until(lambda: records(box), what="the small message")
        assert [r["data"]["value"] for r in got] == [3.0]
        assert src.mapper.counters["payload_too_large"] == 1
        assert src.counters["received"] == 2
        assert src.counters["connects"] == 1
    # where the drop is visible: the broker's log (at its default log level too)
    assert "Dropping too large outgoing PUBLISH for agent-test" in mosquitto.log_file.read_text()


async def test_pause_and_resume_over_tls(tmp_path: Path) -> None:
    """Over TLS, paho may leave decrypted bytes in the TLS buffer, which the socket does
    not report as readable: the resume reads them at once, so nothing stalls."""
    if not have_mosquitto():
        pytest.skip("mosquitto is not installed")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    tls = Tls(tmp_path / "ca.pem", tmp_path / "server.crt", tmp_path / "server.key")
    broker = Mosquitto(tmp_path / "broker", tls=tls)
    broker.start()
    n = 400
    assert broker.tls_port is not None
    conf = _config(broker.tls_port, tls={"ca_file": str(tmp_path / "ca.pem")})
    try:
        async with (
            outbox(tmp_path, max_bytes=1, when_full="block") as box,
            running(conf, box) as src,
        ):
            with Publisher(broker.port, "5") as pub:  # plain listener for the publisher
                await _fill(pub, src)
                pub.publish_many((TOPIC.format(i % 5), _payload(i, 50)) for i in range(1, n + 1))
                await until(lambda: src.status()["reading_paused"], what="reading paused")
                _free(box)
                got = await until(lambda: _values_if_all(box, n), what="every message over TLS")
        assert got == set(range(n + 1))
        assert src.counters["read_pauses"] >= 1
        assert src.counters["connects"] == 1
    finally:
        broker.stop()
