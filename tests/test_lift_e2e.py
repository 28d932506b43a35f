"""Lift monitoring end to end: profile-mapped telemetry from a real broker (private
mosquitto) and from pymodbus's own server, through the rules hook the supervisor uses,
into a real outbox. A rule event and maintenance request commit in the same append as the
reading that raised them; a restart while raised opens no second request.

Delivery after an outage through the forwarder and the reference receiver is checked in
tests/test_lift_delivery.py; tests/cases/rules/outage_while_raised covers the outbox side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.app import SourceSlot
from agent.outbox import Outbox
from agent.pipeline import run_source
from agent.sources.base import Source, SourceContext
from agent.sources.modbus import ModbusConfig, ModbusSource
from agent.sources.mqtt import MqttConfig, MqttSource
from tests.helpers.mosquitto import Mosquitto
from tests.helpers.mqttpub import Publisher
from tests.helpers.waiting import free_port
from tests.helpers.waiting import wait_for as until
from tests.modbus_sim import sim_device, start_server
from tests.mqtt_support import records

CTX = SourceContext(agent_id="gw-1", site="site-default")
INPUT_REGISTERS = 4  # Modbus function code of the table the lift profile uses

RULES: list[dict[str, Any]] = [
    {
        "name": "door_fault",
        "type": "state",
        "point": "fault",
        "values": ["door_fault", "door_lock_fault"],
        "severity": "major",
        "maintenance_request": {"title": "Door fault on {asset}", "priority": "high"},
    },
    {
        "name": "position_stale",
        "type": "stale",
        "point": "position",
        "after": "1s",
        "severity": "warning",
    },
]


@contextlib.asynccontextmanager
async def supervised(source: Source, box: Outbox) -> AsyncIterator[Source]:
    """Run a source the way the supervisor does (rules hook and counting output)."""
    slot = SourceSlot(source.name, source.config, source)
    task = asyncio.create_task(run_source(source, box, rules=True, on_commit=slot.count))
    try:
        yield source
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def rule_records(got: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
    return [
        (r["entity_type"], r["remote_id"], r["data"].get("state") or r["data"].get("status"))
        for r in got
        if r["entity_type"] == "maintenance_request" or r["data"].get("event_type") == "rule"
    ]


def mqtt_lift_config(port: int) -> MqttConfig:
    return MqttConfig.model_validate(
        {
            "type": "mqtt",
            "host": "127.0.0.1",
            "port": port,
            "client_id": "lift-e2e",
            "reconnect_initial": "50ms",
            "reconnect_cap": "500ms",
            "subscriptions": [
                {
                    "topic": "site/{site}/lift/{asset}/state",
                    "profile": "lift_generic",
                    "asset": "{asset}",
                    "site": "{site}",
                    "timestamp_path": "ts",
                },
                {
                    "topic": "site/{site}/rfid/{reader}",
                    "format": "tag_scan",
                    "site": "{site}",
                    "location": "{site}/{reader}",
                    "tag_scan": {"assets": {"E200-1": "L7"}},
                },
            ],
            "rules": RULES,
        }
    )


@pytest.mark.slow
async def test_mqtt_profile_rules_and_restart_while_raised(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    topic = "site/berlin/lift/L7/state"
    conf = mqtt_lift_config(mosquitto.port)

    def msg(ts: int, **values: Any) -> str:
        return json.dumps({"ts": ts, **values})

    async with Outbox(tmp_path / "outbox.db") as box:
        src = MqttSource("lifts", conf, CTX)
        async with supervised(src, box):
            await until(lambda: src.tracker.state == "ok", what="subscribed")
            with Publisher(mosquitto.port) as pub:
                pub.publish(topic, msg(1790000000, fault=0, position=3, speed=1.6))
                pub.publish(topic, msg(1790000010, fault=1, position=4))
                pub.publish("site/berlin/rfid/R-1", json.dumps({"tag": "E200-1"}))
                got = await until(
                    lambda: _having(box, "maintenance_request"), what="maintenance request"
                )
            # The stale timer raises once position stops (after 1 s of silence).
            await until(lambda: _stale(box, "raised"), what="stale raised")
            assert src.rules is not None
            assert src.rules.counters["requests"] == 1
        # Restart while raised: a new source instance on the same outbox.
        src2 = MqttSource("lifts", conf, CTX)
        async with supervised(src2, box):
            await until(lambda: src2.tracker.state == "ok", what="resubscribed")
            with Publisher(mosquitto.port) as pub:
                pub.publish(topic, msg(1790000020, fault=2, position=5))  # still a door fault
                pub.publish(topic, msg(1790000030, fault=0))
                await until(lambda: _door(box, "cleared"), what="door fault cleared")
            await until(lambda: _stale(box, "cleared"), what="stale cleared")
        got = await records(box)
    rules = rule_records(got)
    assert [r for r in rules if r[0] == "maintenance_request"] == [
        ("maintenance_request", "L7/door_fault/20260921T141330.000000Z", "open")
    ]
    door = [r[2] for r in rules if r[1] == "L7/rule/door_fault"]
    assert door == ["raised", "cleared"]
    # The rule records follow the fault reading that raised them, in the same append.
    seqs = [r["data"].get("code") or r["entity_type"] for r in got]
    i = seqs.index("door_fault")
    assert got[i]["data"]["point"] == "fault"
    assert got[i + 1]["data"].get("rule") == "door_fault"
    assert got[i + 2]["entity_type"] == "maintenance_request"
    assert got[i + 2]["source"]["site"] == "berlin"
    scan = next(r for r in got if r["data"].get("event_type") == "tag_scan")
    assert scan["data"]["asset_remote_id"] == "L7"
    assert scan["data"]["location_remote_id"] == "berlin/R-1"
    assert scan["source"]["site"] == "berlin"


async def _having(box: Outbox, entity_type: str) -> list[dict[str, Any]]:
    got = await records(box)
    return got if any(r["entity_type"] == entity_type for r in got) else []


async def _stale(box: Outbox, state: str) -> bool:
    return ("event", "L7/rule/position_stale", state) in rule_records(await records(box))


async def _door(box: Outbox, state: str) -> bool:
    return ("event", "L7/rule/door_fault", state) in rule_records(await records(box))


@pytest.mark.slow
async def test_modbus_profile_rules_with_pymodbus_server(tmp_path: Path) -> None:
    port = free_port()
    server = await start_server([sim_device(3, inputs={0: [0] * 24})], port)
    registers = [0, 1200, 0, 2400, 0, 0, 160, 2, 543, 0, 0, 0]
    conf = ModbusConfig.model_validate(
        {
            "type": "modbus",
            "connections": {"gw": {"host": "127.0.0.1", "port": port, "timeout": "1s"}},
            "devices": {
                "lift-3": {
                    "connection": "gw",
                    "unit_id": 3,
                    "interval": "100ms",
                    "asset": "LIFT-3",
                    "profile": "lift_generic",
                }
            },
            "rules": [
                {
                    "name": "motor_hot",
                    "type": "threshold",
                    "point": "motor_temp",
                    "above": 80,
                    "clear_below": 70,
                    "severity": "critical",
                    "maintenance_request": {"title": "Motor hot on {asset}"},
                },
                {
                    "name": "out_of_service",
                    "type": "state",
                    "point": "out_of_service",
                    "values": ["out_of_service"],
                },
            ],
        }
    )
    try:
        await server.async_setValues(3, INPUT_REGISTERS, 0, registers)  # type: ignore[no-untyped-call]
        async with Outbox(tmp_path / "outbox.db") as box:
            src = ModbusSource("plant", conf, CTX)
            async with supervised(src, box):
                await until(lambda: _point(box, "motor_temp"), what="first poll")
                registers[8], registers[9] = 851, 1  # 85.1 degC, out of service
                await server.async_setValues(3, INPUT_REGISTERS, 0, registers)  # type: ignore[no-untyped-call]
                await until(lambda: _rule(box, "motor_hot", "raised"), what="motor raised")
                await until(lambda: _rule(box, "out_of_service", "raised"), what="oos raised")
                registers[8] = 750  # inside the hysteresis band: stays raised
                await server.async_setValues(3, INPUT_REGISTERS, 0, registers)  # type: ignore[no-untyped-call]
                await until(lambda: _value(box, "motor_temp", 75.0), what="75 degC read")
                registers[8], registers[9] = 650, 0
                await server.async_setValues(3, INPUT_REGISTERS, 0, registers)  # type: ignore[no-untyped-call]
                await until(lambda: _rule(box, "motor_hot", "cleared"), what="motor cleared")
                await until(lambda: _rule(box, "out_of_service", "cleared"), what="oos cleared")
            got = await records(box)
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]
    rules = rule_records(got)
    assert [r[2] for r in rules if r[1] == "LIFT-3/rule/motor_hot"] == ["raised", "cleared"]
    requests = [r for r in rules if r[0] == "maintenance_request"]
    assert len(requests) == 1
    assert requests[0][1].startswith("LIFT-3/motor_hot/")
    trips = next(r for r in got if r["data"].get("point") == "trips")
    assert trips["data"]["value"] == 1200  # profile register map: uint32 at 0-1
    oos = next(r for r in got if r["data"].get("point") == "out_of_service")
    assert oos["data"]["code"] == "in_service"


async def _point(box: Outbox, point: str) -> bool:
    return any(r["data"].get("point") == point for r in await records(box))


async def _value(box: Outbox, point: str, value: float) -> bool:
    return any(
        r["data"].get("point") == point and r["data"].get("value") == pytest.approx(value)
        for r in await records(box)
        if r["entity_type"] == "meter_reading"
    )


async def _rule(box: Outbox, rule: str, state: str) -> bool:
    return any(
        r["data"].get("rule") == rule and r["data"].get("state") == state
        for r in await records(box)
        if r["entity_type"] == "event"
    )
