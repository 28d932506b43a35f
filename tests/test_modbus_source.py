"""The Modbus source against pymodbus's own server on 127.0.0.1 (and a mute-unit proxy)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from pymodbus import FramerType

from agent.outbox import Outbox
from agent.sources.base import SourceContext
from agent.sources.modbus import ModbusConfig, ModbusSource
from agent.sources.modbus.codec import encode
from agent.sources.modbus.config import ConnectionConfig
from agent.sources.modbus.line import Hooks, make_client
from agent.sources.modbus.poller import ConnectionWorker
from tests.helpers.cancel import assert_stops_after_swallowed_cancel, swallowing
from tests.helpers.outputs import TestOutput
from tests.helpers.waiting import free_port, wait_for
from tests.modbus_sim import MuteProxy, running, sim_device, start_server

CTX = SourceContext(agent_id="test-agent", site="plant-1")


def make_config(connections: dict[str, Any], devices: dict[str, Any]) -> ModbusConfig:
    return ModbusConfig.model_validate(
        {"type": "modbus", "connections": connections, "devices": devices}
    )


# Every type and order, at known addresses; values encoded by hand-checked vectors.
TYPED = [
    ("u16", "uint16", "ABCD", [0xFFFE], 65534),
    ("i16", "int16", "ABCD", [0xFFFE], -2),
    ("i16_badc", "int16", "BADC", [0xFEFF], -2),
    ("i32_abcd", "int32", "ABCD", [0xF8A4, 0x32EB], -123456789),
    ("i32_cdab", "int32", "CDAB", [0x32EB, 0xF8A4], -123456789),
    ("u32_badc", "uint32", "BADC", [0x3412, 0x7856], 0x12345678),
    ("u32_dcba", "uint32", "DCBA", [0x7856, 0x3412], 0x12345678),
    ("f32_abcd", "float32", "ABCD", [0x42F6, 0xE979], 123.456),
    ("f32_cdab", "float32", "CDAB", [0xE979, 0x42F6], 123.456),
    ("f32_badc", "float32", "BADC", [0xF642, 0x79E9], 123.456),
    ("f32_dcba", "float32", "DCBA", [0x79E9, 0xF642], 123.456),
    ("u64_abcd", "uint64", "ABCD", [0x0102, 0x0304, 0x0506, 0x0708], 0x0102030405060708),
    ("u64_dcba", "uint64", "DCBA", [0x0807, 0x0605, 0x0403, 0x0201], 0x0102030405060708),
    ("i64_cdab", "int64", "CDAB", [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF], -2),
    ("f64_abcd", "float64", "ABCD", [0x3FF8, 0, 0, 0], 1.5),
    ("f64_badc", "float64", "BADC", [0xF83F, 0, 0, 0], 1.5),
]


def typed_device() -> tuple[dict[int, list[int]], list[dict[str, Any]]]:
    registers: list[int] = []
    points: list[dict[str, Any]] = []
    for name, type_, order, image, _ in TYPED:
        points.append({"name": name, "address": len(registers), "type": type_, "order": order})
        registers += image
    string_at = len(registers)
    registers += [*encode("PUMP-7", "string"), 0]
    points += [
        {"name": "label", "address": string_at, "type": "string", "length": 4},
        {"name": "temp", "address": 200, "type": "int16", "scale": 0.1, "unit": "degC"},
        {"name": "flag3", "address": 201, "type": "bit", "bit": 3},
        {"name": "in1", "table": "input_register", "address": 5, "type": "uint16"},
        {"name": "coil2", "table": "coil", "address": 2, "type": "bool"},
        {"name": "di0", "table": "discrete_input", "address": 0, "type": "bool"},
    ]
    return {0: registers, 200: [215, 0b1000]}, points


async def test_every_type_and_order_over_tcp_rtu_over_tcp_and_serial_url() -> None:
    holding, points = typed_device()
    dev = sim_device(
        1,
        holding=holding,
        inputs={5: [77]},
        coils={0: [False, False, True]},
        discrete={0: [True]},
    )
    tcp_port, rtu_port = free_port(), free_port()
    servers = [
        await start_server([dev], tcp_port),
        await start_server([dev], rtu_port, FramerType.RTU),
    ]
    conns = {
        "tcp": {"host": "127.0.0.1", "port": tcp_port},
        "rtu_tcp": {"transport": "rtu_over_tcp", "host": "127.0.0.1", "port": rtu_port},
        # pyserial opens socket:// URLs like a serial port: RTU framing, serial client.
        "serial": {"transport": "rtu", "serial_port": f"socket://127.0.0.1:{rtu_port}"},
    }
    devices = {
        f"m_{c}": {"connection": c, "unit_id": 1, "interval": "1h", "points": points} for c in conns
    }
    source = ModbusSource("meters", make_config(conns, devices), CTX)
    out = TestOutput()
    try:
        async with running(source, out):
            await wait_for(lambda: len(out.latest()) == 3 * len(points))
    finally:
        for server in servers:
            await server.shutdown()
    latest = out.latest()
    for conn in conns:
        for name, type_, _, _, value in TYPED:
            got = latest[f"m_{conn}.{name}"]
            assert got == (pytest.approx(value, rel=1e-6) if "float" in type_ else value), name
        assert latest[f"m_{conn}.label"] == "PUMP-7"
        assert latest[f"m_{conn}.temp"] == pytest.approx(21.5)
        assert latest[f"m_{conn}.flag3"] is True
        assert latest[f"m_{conn}.in1"] == 77
        assert latest[f"m_{conn}.coil2"] is True
        assert latest[f"m_{conn}.di0"] is True
        status = source.status()["devices"][f"m_{conn}"]
        assert (status["state"], status["detail"]) == ("ok", "online")
        assert status["requests_per_poll"] == 5  # holding x2 (gap > 16), input, coil, discrete
    temp = out.readings("m_tcp.temp")[0]
    assert temp.data["unit"] == "degC"
    assert temp.data["quality"] == "good"
    assert temp.source.system == "modbus"
    assert temp.remote_data == {"unit_id": 1, "table": "holding_register", "raw": 215}


async def write_register(port: int, unit: int, address: int, value: int) -> None:
    """Change a value in the simulated device the way a field device would see it."""
    from pymodbus.client import AsyncModbusTcpClient  # noqa: PLC0415

    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0, reconnect_delay=0)
    assert await client.connect()
    try:
        answer = await client.write_register(address, value, device_id=unit)
        assert not answer.isError()
    finally:
        client.close()


async def test_illegal_address_falls_back_to_split_reads_and_remembers() -> None:
    port = free_port()
    # Registers 0-1 and 4-5 exist; 2-3 and 10 do not: the merged read 0..10 is refused.
    server = await start_server([sim_device(1, holding={0: [11, 12], 4: [44, 45]})], port)
    points = [
        {"name": "a", "address": 0, "type": "uint32"},
        {"name": "b", "address": 4, "type": "uint16"},
        {"name": "missing", "address": 10, "type": "uint16"},
    ]
    conf = make_config(
        {"c": {"host": "127.0.0.1", "port": port}},
        {"d": {"connection": "c", "interval": "20ms", "points": points}},
    )
    source = ModbusSource("m", conf, CTX)
    out = TestOutput()
    try:
        async with running(source, out):
            await wait_for(lambda: source.devices["d"].polls >= 4)
    finally:
        await server.shutdown()
    dev = source.devices["d"]
    status = dev.status()
    assert status["splits"] == 1
    assert status["invalid_points"] == {"missing": "illegal data address"}
    assert [(r.start, r.count) for r in dev.requests] == [(0, 2), (4, 1)]
    # First poll: merged (refused), then 0..1, 4, 10 (refused); later polls: 2 requests
    # (one more poll may have been in flight when the source was stopped).
    assert 4 + 2 * (dev.polls - 1) <= status["requests_sent"] <= 4 + 2 * dev.polls
    assert out.latest() == {"d.a": (11 << 16) | 12, "d.b": 44}
    assert [q.reason for q in out.quarantined] == ["illegal_data_address"]
    assert out.quarantined[0].context["point"] == "missing"
    assert (status["state"], status["detail"]) == ("ok", "online")


async def test_a_cancellation_swallowed_inside_a_read_still_stops_the_worker() -> None:
    """Python 3.11's asyncio.wait_for (pymodbus awaits every answer with it) returns an
    answer that arrived as its task was cancelled and drops the cancellation. The worker
    polled on and a source stop hung (about one test run in five). Here the real client
    is wrapped so that this happens on every read, deterministically."""
    port = free_port()
    server = await start_server([sim_device(1, holding={0: [7]})], port)
    in_read = asyncio.Event()

    class SwallowingClient:
        """The real pymodbus client; its reads behave like 3.11's wait_for at a cancel."""

        def __init__(self, conf: ConnectionConfig, hooks: Hooks) -> None:
            self._real = make_client(conf, hooks)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._real, name)

        async def read_holding_registers(self, *args: Any, **kwargs: Any) -> Any:
            real = self._real.read_holding_registers
            return await swallowing(lambda: real(*args, **kwargs), in_read)

    conf = make_config(
        {"c": {"host": "127.0.0.1", "port": port}},
        {"d": {"connection": "c", "interval": "1h", "points": [{"name": "v", "address": 0}]}},
    )
    source = ModbusSource("m", conf, CTX)
    source._out = TestOutput()
    worker = ConnectionWorker(
        "c", conf.connections["c"], list(source.devices.values()),
        sink=source._emit, on_state=source._device_state, client_factory=SwallowingClient,
    )  # fmt: skip
    task = asyncio.create_task(worker.run())
    try:
        # Without the check the worker polled on and then slept for the device's 1h
        # interval: stopping the source would have hung.
        await assert_stops_after_swallowed_cancel(task, in_read, "the Modbus worker")
        assert source.devices["d"].polls == 1  # the swallowed read did complete
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.shutdown()


async def test_mute_unit_does_not_stall_a_healthy_unit_on_the_same_connection() -> None:
    server_port, proxy_port = free_port(), free_port()
    server = await start_server(
        [sim_device(1, holding={0: [1]}), sim_device(2, holding={0: [2]})], server_port
    )
    proxy = MuteProxy(server_port, mute={2})
    await proxy.start(proxy_port)
    conf = make_config(
        {"gw": {"host": "127.0.0.1", "port": proxy_port, "timeout": "200ms", "retries": 1}},
        {
            "healthy": {"connection": "gw", "unit_id": 1, "interval": "30ms",
                        "points": [{"name": "v", "address": 0}]},
            "mute": {"connection": "gw", "unit_id": 2, "interval": "30ms",
                     "demote_after": 2, "demote_for": "1h",
                     "points": [{"name": "v", "address": 0}]},
        },
    )  # fmt: skip
    source = ModbusSource("m", conf, CTX)
    out = TestOutput()
    healthy, mute = source.devices["healthy"], source.devices["mute"]
    try:
        async with running(source, out):
            await wait_for(lambda: mute.state == "demoted")
            polls_when_demoted = healthy.polls
            await wait_for(lambda: healthy.polls >= polls_when_demoted + 20)
    finally:
        await proxy.stop()
        await server.shutdown()
    assert healthy.state == "online"
    assert healthy.failures == 0
    # Two failed polls of one attempt each (retries are for units that answered their
    # last poll), then no probe within demote_for.
    assert mute.requests_sent == 2 == proxy.swallowed
    assert mute.polls == 2
    assert source.workers["gw"].reconnects == 0
    status = source.status()
    assert source.health().health.state == "degraded"
    assert status["devices"]["mute"]["state"] == "retrying"
    assert status["devices"]["mute"]["detail"] == "demoted"
    assert status["devices"]["mute"]["last_error"] == "no answer (timeout)"
    assert status["devices"]["mute"]["errors"] == {"timeout": 2}
    assert status["devices"]["mute"]["demotions"] == 1
    states = [
        r.data["state"] for r in out.records
        if r.entity_type == "connection_status" and r.data["device"] == "mute"
    ]  # fmt: skip
    assert states == ["demoted"]
    assert all(r.remote_id == "healthy.v" for r in out.records if r.entity_type == "meter_reading")


async def test_reconnects_after_a_server_restart() -> None:
    port = free_port()
    server = await start_server([sim_device(1, holding={0: [100]})], port)
    conf = make_config(
        {"c": {"host": "127.0.0.1", "port": port, "timeout": "300ms",
               "reconnect_initial": "50ms", "reconnect_max": "200ms"}},
        {"d": {"connection": "c", "interval": "30ms", "points": [{"name": "v", "address": 0}]}},
    )  # fmt: skip
    source = ModbusSource("m", conf, CTX)
    out = TestOutput()
    try:
        async with running(source, out):
            await wait_for(lambda: out.latest().get("d.v") == 100)
            await server.shutdown()
            await wait_for(lambda: source.devices["d"].state == "offline")
            server = await start_server([sim_device(1, holding={0: [200]})], port)
            await wait_for(lambda: out.latest().get("d.v") == 200)
    finally:
        await server.shutdown()
    worker = source.workers["c"]
    assert worker.reconnects >= 1
    assert worker.state == "connected"
    assert source.devices["d"].state == "online"


async def test_state_points_emit_events_on_change_with_the_code_table(tmp_path: Path) -> None:
    port = free_port()
    server = await start_server([sim_device(1, holding={0: [0, 17]})], port)
    codes = {
        "0": {"code": "ok", "text": "Normal", "severity": "none"},
        "17": {"code": "door_fault", "text": "Door lock fault", "severity": "major"},
    }
    conf = make_config(
        {"c": {"host": "127.0.0.1", "port": port}},
        {"lift": {"connection": "c", "interval": "20ms", "asset": "LIFT-1", "points": [
            {"name": "state", "address": 0, "kind": "state", "codes": codes},
            {"name": "fault", "address": 1, "kind": "fault", "codes": codes},
        ]}},
    )  # fmt: skip
    source = ModbusSource("m", conf, CTX)
    # The real outbox, end to end: what the source appended is durably there.
    async with Outbox(tmp_path / "outbox.db") as box:
        try:
            async with running(source, box):
                await wait_for(lambda: source.devices["lift"].polls >= 3)
                await write_register(port, 1, 1, 0)  # fault clears
                await write_register(port, 1, 0, 99)  # an unknown state code
                await wait_for(lambda: source.counters["events"] >= 4)
                await wait_for(lambda: source.devices["lift"].polls >= 8)
        finally:
            await server.shutdown()
        leased = await box.lease(1000, 10**9)
    events = [orjson.loads(x.body) for x in leased if x.entity_type == "event"]
    summary = [
        (e["remote_id"], e["data"]["code"], e["data"]["severity"], e["data"]["previous_raw_code"])
        for e in events
    ]
    assert summary[:2] == [
        ("lift.state", "ok", "none", None),
        ("lift.fault", "door_fault", "major", None),
    ]
    # Both writes may land between two polls: then the state event comes first.
    assert sorted(summary[2:]) == [
        ("lift.fault", "ok", "none", 17),
        ("lift.state", "unknown_99", "warning", 0),
    ]
    assert events[0]["data"]["asset_remote_id"] == "LIFT-1"
    assert source.counters["unknown_codes"] == 1


async def test_overruns_skip_slots_and_are_counted_never_stacked() -> None:
    port = free_port()
    server = await start_server([sim_device(1, holding={0: [5]})], port)
    conf = make_config(
        # Each poll takes at least 70 ms (the pause), far beyond the 20 ms interval.
        {"c": {"host": "127.0.0.1", "port": port, "pause_between_requests": "70ms"}},
        {"d": {"connection": "c", "interval": "20ms", "points": [{"name": "v", "address": 0}]}},
    )
    source = ModbusSource("m", conf, CTX)
    dev = source.devices["d"]
    try:
        async with running(source, TestOutput()):
            await wait_for(lambda: dev.polls >= 3)
            polls, overruns = dev.polls, dev.overruns
    finally:
        await server.shutdown()
    assert overruns >= 2 * polls  # every poll skipped at least two 20 ms slots
    assert source.status()["devices"]["d"]["overruns"] == dev.overruns
