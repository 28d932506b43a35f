"""The MQTT sink beyond the contract: message shapes, sizes and presets, against a real
mosquitto on a free port with a subscriber that checks what arrives.

The contract suite (tests/contract/test_sink_contract.py) holds the sink to the Sink
protocol; this module checks what a consumer sees: ThingsBoard's gateway API shapes,
JSON batches split at ``max_message_bytes``, a record too large alone dead-lettered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from agent.forwarder import Forwarder
from agent.health import State
from agent.outbox import Outbox
from agent.records import EntityType, Record
from agent.sinks.mqtt import MqttSink, MqttSinkConfig, topic_of
from tests.helpers.mosquitto import Mosquitto, have_mosquitto
from tests.helpers.mqttsub import Subscriber
from tests.helpers.waiting import wait_for
from tests.outbox_helpers import SRC, T0

pytestmark = pytest.mark.skipif(not have_mosquitto(), reason="mosquitto not installed")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path / "broker")
    m.start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[Outbox]:
    async with Outbox(tmp_path / "outbox.db") as outbox:
        yield outbox


def table(broker: Mosquitto, **over: Any) -> MqttSinkConfig:
    return MqttSinkConfig.model_validate(
        {
            "type": "mqtt",
            "host": "127.0.0.1",
            "port": broker.port,
            "tls": False,
            "client_id": "sink-test",
            "backoff_initial": "50ms",
            "backoff_cap": "200ms",
            **over,
        }
    )


def reading(asset: str, point: str, n: int, pad: int = 0) -> Record:
    data: dict[str, Any] = {"point": point, "asset_remote_id": asset, "value": n}
    if pad:
        data["notes"] = "x" * pad
    return Record.reading(SRC, EntityType.METER_READING, point, T0 + timedelta(seconds=n), data)


async def deliver(box: Outbox, config: MqttSinkConfig, records: list[Record]) -> set[str]:
    """Append ``records`` and run a forwarder until the outbox is empty; their ids."""
    result = await box.append(records)
    fwd = Forwarder(box, config, "agent-1", "s1")
    await fwd.start()
    try:

        async def empty() -> bool:
            return sum((await box.stats()).rows.values()) == 0

        await wait_for(empty, 30, "outbox drained")
    finally:
        await fwd.stop()
    return {i for i in result.ids if i}


async def test_thingsboard_gateway_api_shapes(broker: Mosquitto, box: Outbox) -> None:
    sub = Subscriber(broker.port, "v1/gateway/#")
    try:
        records = [
            reading("lift-3", "load", 1),
            reading("lift-3", "load", 2),
            reading("lift-4", "speed", 3),
            Record.entity(SRC, EntityType.ASSET, "lift-3", {"name": "Lift 3", "floors": 9}),
            Record.entity(
                SRC,
                EntityType.WORK_ORDER,
                "WO-7",
                {"title": "Door motor", "asset_remote_id": "lift-4"},
            ),
        ]
        ids = await deliver(box, table(broker, preset="thingsboard"), records)
        await wait_for(lambda: len(sub.received()) >= 4, 30, "2 connects, telemetry, attributes")
    finally:
        sub.close()
    got = sub.received()
    connects = [orjson.loads(m.payload) for m in got if m.topic == "v1/gateway/connect"]
    assert {c["device"] for c in connects} == {"lift-3", "lift-4"}
    assert all(isinstance(c["type"], str) and c["type"] for c in connects)
    first_data = next(i for i, m in enumerate(got) if m.topic != "v1/gateway/connect")
    assert all(m.topic == "v1/gateway/connect" for m in got[:first_data]), "connect first"
    telemetry: dict[str, list[dict[str, Any]]] = {}
    attributes: dict[str, dict[str, Any]] = {}
    for m in got:
        body = orjson.loads(m.payload)
        if m.topic == "v1/gateway/telemetry":
            for device, entries in body.items():
                assert isinstance(entries, list)
                telemetry.setdefault(device, []).extend(entries)
        elif m.topic == "v1/gateway/attributes":
            for device, attrs in body.items():
                assert isinstance(attrs, dict)
                attributes.setdefault(device, {}).update(attrs)
    assert telemetry["lift-3"] == [
        {"ts": int((T0 + timedelta(seconds=1)).timestamp() * 1000), "values": {"load": 1}},
        {"ts": int((T0 + timedelta(seconds=2)).timestamp() * 1000), "values": {"load": 2}},
    ]
    assert telemetry["lift-4"] == [
        {"ts": int((T0 + timedelta(seconds=3)).timestamp() * 1000), "values": {"speed": 3}}
    ]
    assert attributes["lift-3"]["name"] == "Lift 3"
    assert attributes["lift-3"]["floors"] == 9
    order = attributes["lift-4"]["work_order:WO-7"]
    assert order["title"] == "Door motor"
    assert order["op"] == "upsert"
    assert {attributes["lift-3"]["edge_id"], order["edge_id"]} <= ids


async def test_batches_split_at_max_message_bytes_and_a_too_large_record_is_dead(
    broker: Mosquitto, box: Outbox
) -> None:
    sub = Subscriber(broker.port, "edge/#")
    try:
        small = [reading("a", "p", n, pad=300) for n in range(20)]
        big = reading("a", "p", 99, pad=5000)
        config = table(broker, payload="batch", max_message_bytes="2KiB")
        ids = await deliver(box, config, [*small, big])
        dead = await box.dead_letters()
        want = ids - {d["id"] for d in dead}
        await wait_for(lambda: want <= set(sub.record_ids()), 30, "every small record")
    finally:
        sub.close()
    assert [d["reason"].split(":")[0] for d in dead] == ["too_large"] or len(dead) == 1
    assert len(want) == 20
    sizes = [len(m.payload) for m in sub.received()]
    assert len(sizes) > 1, "one message for 20 records of ~800 bytes under 2KiB"
    assert max(sizes) <= 2048
    for m in sub.received():
        body = orjson.loads(m.payload)
        assert body["agent_id"] == "agent-1"
        assert m.topic == "edge/site-1/meter_reading"


def test_topic_template_placeholders() -> None:
    record = orjson.loads(reading("lift/3", "load", 1).to_json())
    assert (
        topic_of("e/{site}/{asset}/{entity_type}", "a1", record) == "e/site-1/lift_3/meter_reading"
    )
    with pytest.raises(ValidationError, match="unknown placeholder"):
        MqttSinkConfig(type="mqtt", host="h", client_id="c", topic="e/{plant}")
    with pytest.raises(ValidationError, match="fixes the topic"):
        MqttSinkConfig.model_validate(
            {"type": "mqtt", "host": "h", "client_id": "c", "preset": "thingsboard", "topic": "x"}
        )


def test_presets_fill_in_the_platform_conventions(tmp_path: Path) -> None:
    aws = MqttSinkConfig.model_validate(
        {
            "type": "mqtt",
            "host": "x.iot.eu-west-1.amazonaws.com",
            "client_id": "gw1",
            "preset": "aws_iot",
        }
    )
    assert (aws.topic, aws.max_message_bytes, aws.broker_port) == (
        "edge/{client_id}/{entity_type}",
        128 << 10,
        8883,
    )
    with pytest.raises(ValidationError, match="128KiB"):
        MqttSinkConfig.model_validate(
            {
                "type": "mqtt",
                "host": "h",
                "client_id": "c",
                "preset": "aws_iot",
                "max_message_bytes": "256KiB",
            }
        )
    sas = tmp_path / "sas"
    sas.write_text("SharedAccessSignature sr=hub.azure-devices.net%2Fdevices%2Fgw1&sig=x&se=1")
    azure = MqttSinkConfig.model_validate(
        {
            "type": "mqtt",
            "host": "hub.azure-devices.net",
            "client_id": "gw1",
            "preset": "azure_iot",
            "password_file": str(sas),
        }
    )
    assert azure.username == "hub.azure-devices.net/gw1/?api-version=2021-04-12"
    assert azure.protocol == "3.1.1"
    record = orjson.loads(reading("a", "p", 1).to_json())
    assert topic_of(azure.topic, "a1", record, "gw1").startswith("devices/gw1/messages/events/")


async def test_the_brokers_maximum_packet_size_lowers_the_message_limit(
    tmp_path: Path, box: Outbox
) -> None:
    """A broker that announces a Maximum Packet Size (mosquitto ``max_packet_size``) drops
    a client sending a larger packet: messages stay under it, a record too large for it
    alone is dead-lettered, and the connection is never dropped."""
    broker = Mosquitto(tmp_path / "small-broker", extra="max_packet_size 2048\n")
    broker.start()
    sub = Subscriber(broker.port, "edge/#")
    try:
        small = [reading("a", "p", n, pad=300) for n in range(12)]
        big = reading("a", "p", 99, pad=3000)
        config = table(broker, payload="batch")  # max_message_bytes 256KiB
        ids = await deliver(box, config, [*small, big])
        dead = await box.dead_letters()
        want = ids - {d["id"] for d in dead}
        await wait_for(lambda: want <= set(sub.record_ids()), 30, "every small record")
    finally:
        sub.close()
        broker.stop()
    assert len(want) == 12
    assert len(dead) == 1
    assert "too_large" in str(dead[0])
    assert max(len(m.payload) for m in sub.received()) < 2048
    assert "exceeded maximum packet size" not in broker.log_text().lower()


async def test_health_shows_a_lost_connection_before_the_next_send(broker: Mosquitto) -> None:
    sink = MqttSink(table(broker), "agent-1")
    await sink.open()
    try:
        assert sink.health().state is State.OK
        await asyncio.to_thread(broker.stop)
        await wait_for(
            lambda: sink.health().state is State.RETRYING, 30, "retrying", detail=sink.health
        )
        assert "connection lost" in (sink.health().reason or "")
    finally:
        await sink.close()
    assert sink.health().state is State.STOPPED


async def test_azure_iot_preset_publishes_over_mqtt_311(
    broker: Mosquitto, box: Outbox, tmp_path: Path
) -> None:
    """The azure_iot preset's path (MQTT 3.1.1: no properties, PUBACKs without reason
    codes, clean_session false) against mosquitto standing in for IoT Hub."""
    sas = tmp_path / "sas"
    sas.write_text("SharedAccessSignature sr=x&sig=y&se=1")
    sub = Subscriber(broker.port, "devices/#")
    try:
        config = table(broker, preset="azure_iot", client_id="gw1", password_file=str(sas))
        ids = await deliver(box, config, [reading("a", "p", n) for n in range(5)])
        await wait_for(lambda: ids <= set(sub.record_ids()), 30, "every record")
    finally:
        sub.close()
    assert {m.topic for m in sub.received()} == {
        "devices/gw1/messages/events/$.ct=application%2Fjson&$.ce=utf-8"
    }
    assert "as gw1 (p2, c0" in broker.log_text()  # MQTT 3.1.1, clean session off
