"""Benchmark: what edge rules cost on the append path.

Figure: records/s appended through a source's pipeline with its rules engine (6 rules of
every type on 200 lifts, about 1 % of samples raising or clearing a rule) into a real
outbox, in batches of 100 as the MQTT source commits them.
Ceiling, measured in the same run on the same disk: the same batches appended straight
into an outbox without rules.

    python benchmarks/rules_eval.py [--quick] [--records N] [--batch B]

The last line printed is one JSON object (benchmark, value, unit, ceiling, ratio, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydantic import TypeAdapter

from agent.outbox import Outbox
from agent.pipeline import Pipeline
from agent.records import EntityType, Record, SourceRef
from agent.rules.config import RuleConfig
from agent.rules.engine import RuleEngine

SRC = SourceRef("bench-lifts", "mqtt", "site-a")
T0 = datetime(2026, 11, 22, tzinfo=UTC)
RULES = TypeAdapter(list[RuleConfig]).validate_python(
    [
        {
            "name": "hot",
            "type": "threshold",
            "point": "motor_temp",
            "above": 80,
            "clear_below": 70,
            "maintenance_request": {},
        },
        {"name": "slow", "type": "threshold", "point": "speed", "below": 0.2, "for": "1m"},
        {
            "name": "door",
            "type": "state",
            "point": "fault",
            "values": ["door_fault"],
            "maintenance_request": {},
        },
        {"name": "oos", "type": "state", "point": "out_of_service", "values": [True], "for": "15m"},
        {"name": "storm", "type": "rate", "point": "fault", "max": 3, "per": "1h"},
        {"name": "stale", "type": "stale", "point": "position", "after": "30m"},
    ]
)


def make_records(n: int) -> list[Record]:
    """Lift telemetry: temperatures, speeds, positions and occasional faults."""
    rng = random.Random(11)
    out: list[Record] = []
    for i in range(n):
        asset = f"L{i % 200}"
        at = T0 + timedelta(seconds=i // 200)
        kind = rng.random()
        data: dict[str, object] = {"asset_remote_id": asset}
        if kind < 0.02:
            data |= {"point": "fault", "code": rng.choice(["door_fault", "ok"])}
            entity = EntityType.EVENT
        else:
            point = rng.choice(["motor_temp", "speed", "position"])
            value = {
                "motor_temp": rng.gauss(60, 8),
                "speed": rng.uniform(0, 1.6),
                "position": rng.randrange(12),
            }[point]
            data |= {"point": point, "value": value, "unit": None}
            entity = EntityType.METER_READING
        out.append(Record.reading(SRC, entity, f"{asset}/{data['point']}", at, data))
    return out


async def run(path: Path, records: list[Record], batch: int, rules: bool) -> float:
    async with Outbox(path, max_bytes=1 << 34) as box:
        out = Pipeline(box, RuleEngine(SRC.name, RULES, SRC)) if rules else box
        began = time.perf_counter()
        for i in range(0, len(records), batch):
            await out.append(records[i : i + batch])
        return time.perf_counter() - began


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40k records (< 30 s)")
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    n = 40_000 if args.quick else args.records
    records = make_records(n)
    with tempfile.TemporaryDirectory() as d:
        ceiling_s = asyncio.run(run(Path(d) / "plain.db", records, args.batch, rules=False))
        rules_s = asyncio.run(run(Path(d) / "rules.db", records, args.batch, rules=True))
    value, ceiling = n / rules_s, n / ceiling_s
    print(f"records={n} batch={args.batch} rules={len(RULES)}")
    print(f"with rules: {rules_s:.2f} s  {value:,.0f} records/s")
    print(f"without rules: {ceiling_s:.2f} s  {ceiling:,.0f} records/s")
    print(
        json.dumps(
            {
                "benchmark": "rules_eval",
                "value": round(value),
                "unit": "records/s",
                "ceiling": round(ceiling),
                "ratio": round(value / ceiling, 3),
                "records": n,
                "batch": args.batch,
                "rules": len(RULES),
            }
        )
    )


if __name__ == "__main__":
    main()
