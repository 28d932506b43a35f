"""Benchmark: Modbus polling of 50 simulated devices x 40 points.

Devices sit behind 5 simulated gateways (pymodbus's own TCP server, in process) with 10
unit ids each; every device has a contiguous map of 40 points (30 float64 + 5 uint32
holding registers = 130 registers, so the 125-register limit forces a second request,
plus 5 coils). All devices poll on the same interval.

Figures:
* value: read requests per poll cycle as planned (all devices);
* ceiling: the fewest requests any plan can make (distinct addresses / request limit),
  computed from the same maps; ratio = value / ceiling (1.0 = optimal);
* poll time p50/p99 of one device, "sweep" p99 (slot to completion, i.e. the time a
  gateway needs for its 10 units), start jitter p99, overruns, readings per second.

    python benchmarks/modbus_poll.py [--quick] [--devices N] [--interval S] [--seconds S]

The last line printed is one JSON object (benchmark, value, unit, ceiling, ratio, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from agent.outbox import AppendResult, Cursor, Quarantined
from agent.records import Record
from agent.sources.base import SourceContext
from agent.sources.modbus import ModbusConfig, ModbusSource
from agent.sources.modbus.codec import encode
from agent.sources.modbus.planner import minimum_requests
from agent.sources.modbus.poller import percentile
from tests.helpers.waiting import free_port

UNITS_PER_GATEWAY = 10


class CountingOutput:
    """Counts what the source appends (the outbox has its own benchmark)."""

    def __init__(self) -> None:
        self.records = 0

    async def append(
        self,
        records: Sequence[Record],
        cursor: Cursor | None = None,
        *,
        dedupe: bool = False,
        quarantine: Sequence[Quarantined] = (),
    ) -> AppendResult:
        self.records += len(records)
        return AppendResult(stored=len(records))

    async def cursor(self, source: str, key: str) -> Any | None:
        return None


def device_map(unit: int) -> tuple[SimDevice, list[dict[str, Any]]]:
    regs: list[int] = []
    points: list[dict[str, Any]] = []
    for i in range(30):
        points.append({"name": f"f64_{i}", "address": len(regs), "type": "float64"})
        regs += encode(unit * 100.0 + i / 4, "float64")
    for i in range(5):
        points.append({"name": f"u32_{i}", "address": len(regs), "type": "uint32"})
        regs += encode(unit * 1000 + i, "uint32")
    points += [
        {"name": f"coil_{i}", "table": "coil", "address": i, "type": "bool"} for i in range(5)
    ]
    sim = SimDevice(
        id=unit,
        simdata=(
            [SimData(0, values=[True, False] * 4, datatype=DataType.BITS)],
            [SimData(0, values=[False], datatype=DataType.BITS)],
            [SimData(0, values=regs, datatype=DataType.REGISTERS)],
            [SimData(0, values=[0], datatype=DataType.REGISTERS)],
        ),
    )
    return sim, points


async def run(devices: int, interval: float, seconds: float) -> dict[str, Any]:
    gateways = -(-devices // UNITS_PER_GATEWAY)
    servers: list[ModbusTcpServer] = []
    connections: dict[str, Any] = {}
    device_conf: dict[str, Any] = {}
    for g in range(gateways):
        sims = []
        port = free_port()
        for u in range(1, UNITS_PER_GATEWAY + 1):
            if len(device_conf) == devices:
                break
            sim, points = device_map(u)
            sims.append(sim)
            device_conf[f"gw{g}-u{u}"] = {
                "connection": f"gw{g}",
                "unit_id": u,
                "interval": interval,
                "points": points,
            }
        server = ModbusTcpServer(sims, address=("127.0.0.1", port))
        await server.serve_forever(background=True)
        servers.append(server)
        connections[f"gw{g}"] = {"host": "127.0.0.1", "port": port, "timeout": "2s"}
    config = ModbusConfig.model_validate(
        {"type": "modbus", "connections": connections, "devices": device_conf}
    )
    source = ModbusSource("bench", config, SourceContext("bench", None))
    out = CountingOutput()
    task = asyncio.create_task(source.run(out))
    await asyncio.sleep(interval * 2)  # warm-up: connect, first polls
    states = list(source.devices.values())
    base_polls = sum(d.polls for d in states)
    for d in states:
        d.jitter.clear()
        d.done_lag.clear()
    base_records, began = out.records, time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - began
    polls = sum(d.polls for d in states) - base_polls
    records = out.records - base_records
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    for server in servers:
        await server.shutdown()

    planned = sum(len(d.requests) for d in states)
    minimum = sum(minimum_requests(c) for c in config.devices.values())
    jitter = [j for d in states for j in d.jitter]
    done = [x for d in states for x in d.done_lag]
    cycle = [x for d in states for x in (d.last_cycle_seconds,) if x is not None]
    return {
        "benchmark": "modbus_poll",
        "value": planned,
        "unit": "requests/cycle",
        "ceiling": minimum,
        "ratio": round(planned / minimum, 4),
        "devices": devices,
        "points_per_device": 40,
        "gateways": gateways,
        "interval_s": interval,
        "measured_s": round(elapsed, 2),
        "polls": polls,
        "expected_polls": round(devices * elapsed / interval),
        "failures": sum(d.failures for d in states),
        "overruns": sum(d.overruns for d in states),
        "device_poll_ms_p50": round(percentile(cycle, 50) * 1000, 2),
        "sweep_ms_p99": round(percentile(done, 99) * 1000, 2),
        "jitter_ms_p99": round(percentile(jitter, 99) * 1000, 2),
        "jitter_ms_p50": round(percentile(jitter, 50) * 1000, 2),
        "readings_per_s": round(records / elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 30 s)")
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--interval", type=float, default=1.0, help="poll interval, seconds")
    parser.add_argument("--seconds", type=float, default=None, help="measured time")
    args = parser.parse_args()
    seconds = args.seconds or (8.0 if args.quick else 30.0)
    result = asyncio.run(run(args.devices, args.interval, seconds))
    for key, value in result.items():
        if key != "benchmark":
            print(f"{key:>20}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
