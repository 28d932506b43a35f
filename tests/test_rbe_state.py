"""Report-by-exception state is per point and survives unrelated failures.

Issue 16 ("Why", point 5): a payload that failed mapping reset the RBE state of every
point, so equal values were sent again after every bad message. The state of a point
may only go back when that point's own records were not stored: a message whose mapping
failed half-way (only that message's points), a failed commit (only that batch's points,
or that Modbus poll's). Real peers: a private mosquitto, pymodbus's server and the real
outbox (made to fail its next append the way a full disk does, tests/rules_harness.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.outbox import Outbox
from agent.rbe import RbeFilter, RbeUndo, ReportByException
from agent.sources.base import SourceContext
from agent.sources.modbus import ModbusConfig, ModbusSource
from agent.sources.mqtt import MqttConfig
from agent.sources.mqtt import mapping as mqtt_mapping
from tests.helpers.mosquitto import Mosquitto
from tests.helpers.mqttpub import Publisher
from tests.helpers.outputs import TestOutput
from tests.helpers.waiting import free_port, wait_for
from tests.modbus_sim import running as running_modbus
from tests.modbus_sim import sim_device, start_server
from tests.mqtt_support import outbox, quarantine, records, running, until

DEADBAND = {"deadband": 1.0}


def config(port: int) -> MqttConfig:
    """Three topics: ``w`` (RBE) stands for every unrelated point; ``v`` (RBE) shares a
    message with an event point; ``n`` is an integer point fed bad input."""
    codes = {"1": {"code": "ok", "severity": "none"}, "99": {"code": "boom"}}
    return MqttConfig.model_validate(
        {
            "type": "mqtt",
            "host": "127.0.0.1",
            "port": port,
            "client_id": "rbe-test",
            "reconnect_initial": "50ms",
            "reconnect_cap": "500ms",
            "subscriptions": [
                {"topic": "rbe/w", "points": [{"name": "w", "path": "w", "rbe": DEADBAND}]},
                {
                    "topic": "rbe/v",
                    "points": [
                        {"name": "v", "path": "v", "rbe": DEADBAND},
                        {"name": "code", "path": "code", "entity": "event", "codes": codes},
                    ],
                },
                {"topic": "rbe/n", "points": [{"name": "n", "path": "n", "type": "int"}]},
            ],
        }
    )


class Feed:
    """Publishes one message at a time and waits until the source has committed it (one
    message per batch, so what a batch holds is known)."""

    def __init__(self, pub: Publisher, source: Any) -> None:
        self.pub, self.source, self.sent = pub, source, 0

    async def send(self, topic: str, doc: dict[str, Any] | str) -> None:
        self.pub.publish(topic, doc if isinstance(doc, str) else json.dumps(doc))
        self.sent += 1
        await until(lambda: self.source.counters["acked"] >= self.sent, what="committed")


def values(got: list[dict[str, Any]], point: str) -> list[Any]:
    field = "code" if point == "code" else "value"
    return [r["data"][field] for r in got if r["data"]["point"] == point]


async def test_a_payload_that_fails_mapping_leaves_other_points_alone(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """An integer too large for a record (a real payload: the mapping used to raise on it,
    and the source reset every point's RBE state): quarantined with its reason, and the
    equal value of another point after it is still suppressed."""
    async with outbox(tmp_path) as box, running(config(mosquitto.port), box) as src:
        with Publisher(mosquitto.port) as pub:
            feed = Feed(pub, src)
            await feed.send("rbe/w", {"w": 5})
            await feed.send("rbe/w", {"w": 5})  # suppressed
            await feed.send("rbe/n", {"n": "123456789012345678901234567890"})
            await feed.send("rbe/w", {"w": 5})  # still suppressed
            await feed.send("rbe/w", {"w": 5.5})  # inside the deadband
            await feed.send("rbe/w", {"w": 7})
        got, bad = await records(box), await quarantine(box)
    assert values(got, "w") == [5, 7]
    assert [(q["reason"], q["context"]["problems"][0]["detail"]) for q in bad] == [
        ("wrong_type", "point n: integer 123456789012345678901234567890 is out of the 64-bit range")
    ]
    assert src.status()["rbe_suppressed"] == 3


async def test_a_mapper_bug_rolls_back_only_its_own_message(
    mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug raised half-way through a message, after its first point passed RBE: that
    point's state goes back (its record was not stored: the next equal value is reported),
    every other point keeps its state."""
    translate = mqtt_mapping.translate

    def buggy(value: Any, *args: Any) -> Any:
        if value == 99:
            raise ZeroDivisionError("injected mapper bug")
        return translate(value, *args)

    monkeypatch.setattr(mqtt_mapping, "translate", buggy)
    async with outbox(tmp_path) as box, running(config(mosquitto.port), box) as src:
        with Publisher(mosquitto.port) as pub:
            feed = Feed(pub, src)
            await feed.send("rbe/w", {"w": 5})
            await feed.send("rbe/v", {"v": 10, "code": 99})  # v passes RBE, then the bug
            await feed.send("rbe/v", {"v": 10, "code": 1})  # v=10 was never stored: reported
            await feed.send("rbe/w", {"w": 5})  # w's state is intact: suppressed
            await feed.send("rbe/v", {"v": 10, "code": 1})  # now v=10 is stored: suppressed
        got, bad = await records(box), await quarantine(box)
    assert values(got, "w") == [5]
    assert values(got, "v") == [10]
    assert [q["reason"] for q in bad] == ["mapping_failed"]
    assert src.status()["rbe_suppressed"] == 2


async def test_a_failed_commit_rolls_back_only_that_batch(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The outbox refuses a batch (disk full): the broker redelivers it and its points
    report again; the points of earlier, stored batches keep their state."""
    async with outbox(tmp_path) as box:
        flaky = TestOutput(box)
        async with running(config(mosquitto.port), flaky) as src:  # type: ignore[arg-type]
            with Publisher(mosquitto.port) as pub:
                feed = Feed(pub, src)
                await feed.send("rbe/w", {"w": 5})
                flaky.fail()  # the next append: disk full
                await feed.send("rbe/v", {"v": 10, "code": 1})  # refused, then redelivered
                await feed.send("rbe/w", {"w": 5})  # suppressed: w=5 is stored
                await feed.send("rbe/v", {"v": 10, "code": 1})  # suppressed: stored now
        got = await records(box)
    assert src.counters["errors_outbox"] == 1
    assert values(got, "w") == [5]
    assert values(got, "v") == [10]
    assert src.status()["rbe_suppressed"] == 2  # the refused batch's checks not counted


def modbus_config(port: int) -> ModbusConfig:
    rbe = {"deadband": 1.0}
    return ModbusConfig.model_validate(
        {
            "type": "modbus",
            "connections": {"c": {"host": "127.0.0.1", "port": port}},
            "devices": {
                "pump": {
                    "connection": "c",
                    "unit_id": 1,
                    "interval": "20ms",
                    "points": [{"name": "temp", "address": 0, "type": "uint16", "rbe": rbe}],
                },
                "fan": {
                    "connection": "c",
                    "unit_id": 2,
                    "interval": "20ms",
                    "points": [{"name": "rpm", "address": 0, "type": "uint16", "rbe": rbe}],
                },
            },
        }
    )


async def test_modbus_failed_append_reports_its_points_again(tmp_path: Path) -> None:
    """A poll whose append failed taught RBE nothing: after the source restarts (the
    supervisor runs the same source object again) the unchanged value is reported, where
    it used to be suppressed until it changed."""
    port = free_port()
    server = await start_server(
        [sim_device(1, holding={0: [40]}), sim_device(2, holding={0: [900]})], port
    )
    source = ModbusSource("m", modbus_config(port), SourceContext("gw", "s1"))
    try:
        async with Outbox(tmp_path / "outbox.db") as box:
            flaky = TestOutput(box)  # its first append holding a reading fails (disk full)
            flaky.fail(when=lambda records: any(r.entity_type == "meter_reading" for r in records))
            first = asyncio.create_task(source.run(flaky))
            with pytest.raises(ExceptionGroup) as failed:
                await first
            assert "disk full" in repr(failed.value.exceptions)
            async with running_modbus(source, box):  # restarted, as the supervisor does
                await wait_for(lambda: source.counters["records"] >= 2, what="both reported")
                await wait_for(lambda: source.devices["pump"].polls >= 6, what="polled on")
            leased = await box.lease(100, 10**9)
    finally:
        await server.shutdown()
    readings = [orjson.loads(x.body) for x in leased if x.entity_type == "meter_reading"]
    assert sorted((r["remote_id"], r["data"]["value"]) for r in readings) == [
        ("fan.rpm", 900),
        ("pump.temp", 40),
    ]
    assert source.counters["records"] == 2  # once each: then RBE suppresses the equal polls


def test_rollback_to_a_mark_undoes_only_what_came_after() -> None:
    rbe, undo, s = RbeFilter(), RbeUndo(), ReportByException(deadband=1.0)
    assert rbe.check("a", 1, 0.0, s, undo=undo)
    assert not rbe.check("a", 1, 1.0, s, undo=undo)
    mark = undo.mark()
    assert rbe.check("b", 1, 1.0, s, undo=undo)
    assert rbe.check("a", 5, 2.0, s, undo=undo)
    assert not rbe.check("b", 1, 3.0, s, undo=undo)
    rbe.rollback(undo, mark)
    assert (rbe.last_value("a"), rbe.last_value("b"), rbe.suppressed) == (1, None, 1)
    rbe.rollback(undo)
    assert (rbe.last_value("a"), rbe.suppressed) == (None, 0)
    assert rbe.check("a", 1, 4.0, s)  # reported again, never less
