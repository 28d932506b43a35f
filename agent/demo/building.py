"""A simulated building for the demo: a lift controller and an energy meter on Modbus, an
IoT feed over MQTT, and a CMMS database whose work orders change while the demo runs.

Every simulator records what it produced, so the demo can check at the end that nothing
was lost on the way to the upstream.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from agent.records import format_observed

LIFT_UNIT = 1
METER_UNIT = 2
HOLDING = 3  # Modbus function code of "read holding registers": the table we write into


def _device(unit: int, registers: int) -> SimDevice:
    blocks = [SimData(0, values=[0] * registers, datatype=DataType.REGISTERS)]
    bits = [SimData(0, values=[False], datatype=DataType.BITS)]
    return SimDevice(id=unit, simdata=(bits, bits, blocks, blocks))


class ModbusPlant:
    """One Modbus TCP gateway with a lift controller (unit 1) and an energy meter (unit 2).

    Lift registers: 0-1 trips (uint32), 2-3 door cycles (uint32), 4 car position (int16),
    5 motor temperature x10 (int16), 6 operating state, 7 fault code.
    Meter registers: 0-1 active energy x10 kWh (uint32), 2 power W, 3 voltage x10.
    """

    def __init__(self, port: int, rng: random.Random) -> None:
        self.port = port
        self.rng = rng
        self.server: ModbusTcpServer | None = None
        self.trips = 0
        self.doors = 0
        self.floor = 0
        self.temp = 38.0
        self.state = 0
        self.fault = 0
        self.energy = 125_000.0
        self.ticks = 0

    async def start(self) -> None:
        """Serve on 127.0.0.1:port."""
        devices = [_device(LIFT_UNIT, 8), _device(METER_UNIT, 4)]
        self.server = ModbusTcpServer(devices, address=("127.0.0.1", self.port))
        await self.server.serve_forever(background=True)
        await self._write()

    async def stop(self) -> None:
        """Stop serving."""
        if self.server is not None:
            await self.server.shutdown()  # type: ignore[no-untyped-call]

    async def tick(self) -> None:
        """Advance the simulation by one step and update the registers."""
        rng = self.rng
        self.ticks += 1
        if rng.random() < 0.6:
            self.trips += 1
            self.doors += 2
            self.floor = rng.randrange(0, 12)
        self.temp = min(85.0, max(25.0, self.temp + rng.uniform(-0.4, 0.6)))
        if self.fault == 0 and rng.random() < 0.03:
            self.fault, self.state = rng.choice([17, 42, 101]), 2  # a door fault
        elif self.fault and rng.random() < 0.2:
            self.fault, self.state = 0, 0
        self.energy += rng.uniform(2.0, 6.0)
        await self._write()

    async def _write(self) -> None:
        assert self.server is not None
        e = int(self.energy)
        lift = [
            self.trips >> 16,
            self.trips & 0xFFFF,
            self.doors >> 16,
            self.doors & 0xFFFF,
            self.floor,
            int(self.temp * 10),
            self.state,
            self.fault,
        ]
        meter = [
            e >> 16,
            e & 0xFFFF,
            self.rng.randrange(3000, 9000),
            int(self.rng.uniform(228, 233) * 10),
        ]
        await self.server.async_setValues(LIFT_UNIT, HOLDING, 0, lift)
        await self.server.async_setValues(METER_UNIT, HOLDING, 0, meter)


def observation_key(remote_id: str, observed_at: str) -> str:
    """How the demo names one observation of one point: ``<remote_id>@<observed_at>``."""
    return f"{remote_id}@{observed_at}"


@dataclass
class MqttFeed:
    """IoT sensors publishing JSON telemetry (QoS 1) to the demo's broker.

    Every good message's observation is known in advance (point and time), so the demo
    can check each one reached the upstream. One malformed message in ``bad_every`` shows
    quarantine at work.
    """

    port: int
    source: str
    rng: random.Random
    bad_every: int = 40
    expected: set[str] = field(default_factory=set)  # "<remote_id>@<observed_at>"
    published: int = 0
    malformed: int = 0
    _last_ms: int = 0

    def expect(self, point_id: str, ts_ms: int) -> None:
        """Remember the observation the agent must deliver for this sample."""
        at = format_observed(datetime.fromtimestamp(ts_ms / 1000, UTC))
        self.expected.add(observation_key(point_id, at))

    async def run(self, stop: asyncio.Event, period: float = 0.25) -> None:
        """Publish until ``stop`` is set."""
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="demo-iot-feed") as client:
            while not stop.is_set():
                ts = max(int(time.time() * 1000), self._last_ms + 1)
                self._last_ms = ts
                self.published += 1
                if self.published % self.bad_every == 0:
                    self.malformed += 1
                    await client.publish(
                        "site/demo/escalator/ESC-1/telemetry", b"{vibration: oops", qos=1
                    )
                    continue
                esc = {
                    "ts": ts,
                    "vibration_mm_s": round(self.rng.uniform(0.8, 4.5), 2),
                    "step_speed_m_s": round(self.rng.uniform(0.49, 0.51), 3),
                }
                await client.publish(
                    "site/demo/escalator/ESC-1/telemetry", orjson.dumps(esc), qos=1
                )
                self.expect("ESC-1/vibration", ts)
                self.expect("ESC-1/step_speed", ts)
                if self.published % 4 == 0:
                    ahu = {"ts": ts, "supply_temp": round(self.rng.uniform(16, 19), 1)}
                    await client.publish("site/demo/hvac/AHU-1/telemetry", orjson.dumps(ahu), qos=1)
                    self.expect("AHU-1/supply_temp", ts)
                with_timeout = asyncio.ensure_future(stop.wait())
                await asyncio.wait([with_timeout], timeout=period)
                with_timeout.cancel()


class Cmms:
    """A small CMMS database (SQLite) whose work orders and assets change over time."""

    STATUSES = ("open", "released", "in_progress", "completed")

    def __init__(self, path: Path, rng: random.Random) -> None:
        self.path = path
        self.rng = rng
        self.changes = 0
        con = sqlite3.connect(path)
        con.executescript(
            """
            CREATE TABLE assets (asset_id TEXT PRIMARY KEY, name TEXT NOT NULL,
                location TEXT, status TEXT NOT NULL, updated_at TEXT NOT NULL);
            CREATE TABLE work_orders (wo_id INTEGER PRIMARY KEY, asset_id TEXT NOT NULL,
                title TEXT NOT NULL, status TEXT NOT NULL, priority INTEGER NOT NULL,
                updated_at TEXT NOT NULL);
            """
        )
        now = self._now()
        assets = [
            ("LIFT-1", "Passenger lift 1", "Tower A", "in_service", now),
            ("ESC-1", "Escalator 1", "Mall level 0", "in_service", now),
            ("AHU-1", "Air handling unit 1", "Roof", "in_service", now),
            ("MTR-1", "Main energy meter", "LV room", "in_service", now),
        ]
        con.executemany("INSERT INTO assets VALUES (?, ?, ?, ?, ?)", assets)
        for i in range(1, 9):
            con.execute(
                "INSERT INTO work_orders VALUES (?, ?, ?, ?, ?, ?)",
                (i, assets[i % 4][0], f"Scheduled inspection {i}", "open", 3, now),
            )
        con.commit()
        con.close()

    @staticmethod
    def _now() -> str:
        return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")

    def tick(self) -> None:
        """One change: a new work order, a status step, or an asset status flip."""
        con = sqlite3.connect(self.path)
        try:
            now = self._now()
            roll = self.rng.random()
            if roll < 0.35:
                asset = self.rng.choice(["LIFT-1", "ESC-1", "AHU-1", "MTR-1"])
                con.execute(
                    "INSERT INTO work_orders (asset_id, title, status, priority, updated_at) "
                    "VALUES (?, ?, 'open', ?, ?)",
                    (asset, f"Fault follow-up on {asset}", self.rng.randint(1, 4), now),
                )
            elif roll < 0.9:
                row = con.execute(
                    "SELECT wo_id, status FROM work_orders WHERE status != 'completed' "
                    "ORDER BY RANDOM() LIMIT 1"
                ).fetchone()
                if row is not None:
                    nxt = self.STATUSES[self.STATUSES.index(row[1]) + 1]
                    con.execute(
                        "UPDATE work_orders SET status = ?, updated_at = ? WHERE wo_id = ?",
                        (nxt, now, row[0]),
                    )
            else:
                asset = self.rng.choice(["LIFT-1", "ESC-1"])
                con.execute(
                    "UPDATE assets SET status = CASE status WHEN 'in_service' "
                    "THEN 'out_of_service' ELSE 'in_service' END, updated_at = ? "
                    "WHERE asset_id = ?",
                    (now, asset),
                )
            con.commit()
            self.changes += 1
        finally:
            con.close()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """The current rows: {"work_order:<id>": {...}, "asset:<id>": {...}}."""
        con = sqlite3.connect(self.path)
        try:
            out: dict[str, dict[str, Any]] = {}
            for wo_id, status, title in con.execute("SELECT wo_id, status, title FROM work_orders"):
                out[f"work_order:{wo_id}"] = {"status": status, "title": title}
            for asset_id, status, name in con.execute("SELECT asset_id, status, name FROM assets"):
                out[f"asset:{asset_id}"] = {"status": status, "name": name}
            return out
        finally:
            con.close()
