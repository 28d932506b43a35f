"""Drive the rules engine through a real outbox from a simulated telemetry sequence.

A case folder (tests/cases/rules/<name>/) holds ``config.toml`` (``[[rules]]`` tables and
an optional ``[source]`` with ``name`` and ``site``), ``input.jsonl`` and
``expected.jsonl``. Input lines, in order:

* ``{"at": T, "asset": A, "point": P, "value": V}``: a meter reading;
* ``{"at": T, "asset": A, "point": P, "event": {...}}``: an event (``code``/``state``...);
  optional ``"site"`` and ``"received"`` (receive time, default ``at``);
* ``{"tick": T}``: the rules timer runs at T;
* ``{"restart": true}``: the agent restarts (the engine reloads from the outbox);
* ``{"fail_next_commit": true}``: the next commit fails (disk full) and is retried by
  the source (the same input again) on the following line;
* ``{"deliver": true}``: the upstream is reachable: everything queued is leased and
  acknowledged, and the delivered rule records are listed (an outage is just a stretch
  of input without ``deliver``).

Output: after each line, the rule records it committed; a ``delivered`` line per
``deliver``; finally the durable rule state and the counters.
"""

from __future__ import annotations

import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import TypeAdapter

from agent.errors import OutboxWriteError
from agent.outbox import Outbox
from agent.pipeline import Pipeline
from agent.records import EntityType, Record, SourceRef
from agent.rules.config import RuleConfig
from agent.rules.engine import RuleEngine
from tests.helpers.outputs import TestOutput
from tests.outbox_helpers import pin_epoch

RULES = TypeAdapter(list[RuleConfig])
EPOCH = "7d0c3b1e-5f4a-4e2b-9c8d-1a2b3c4d5e6f"
"""The outbox epoch of every case (see DESIGN.md "Delivery guarantee")."""


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text)


def compact(env: dict[str, Any]) -> dict[str, Any]:
    """What a golden line shows of a rule record."""
    data = env["data"]
    out: dict[str, Any] = {
        "id": env["id"],
        "type": env["entity_type"],
        "remote_id": env["remote_id"],
        "at": env["observed_at"],
        "site": env["source"]["site"],
    }
    keys = (
        "rule",
        "state",
        "severity",
        "value",
        "raised_at",
        "cleared_at",
        "maintenance_request_remote_id",
    )
    if env["entity_type"] == "maintenance_request":
        keys = ("rule", "status", "priority", "title", "raised_at", "trigger")
    return out | {k: data.get(k) for k in keys}


def is_rule_record(env: dict[str, Any]) -> bool:
    return env["entity_type"] == "maintenance_request" or env["data"].get("event_type") == "rule"


class Case:
    """One golden case run."""

    def __init__(self, folder: Path, workdir: Path) -> None:
        conf = tomllib.loads((folder / "config.toml").read_text())
        self.rules = RULES.validate_python(conf.get("rules", []))
        source = conf.get("source", {})
        self.ref = SourceRef(source.get("name", "lifts"), "mqtt", source.get("site", "site-a"))
        self.folder = folder
        # A fixed epoch: the stored ids of entity versions (requests) are chained from it.
        pin_epoch(workdir / "outbox.db", EPOCH)
        self.box = Outbox(workdir / "outbox.db")
        self.flaky = TestOutput(self.box)
        self.out: Pipeline | None = None
        self.seen = 0
        self.lines: list[dict[str, Any]] = []

    async def start(self) -> None:
        engine = RuleEngine(self.ref.name, self.rules, self.ref)
        saved = await self.box.cursors(self.ref.name)
        first = self._first_time()
        engine.restore(saved, first)
        self.out = Pipeline(self.flaky, engine)

    def _first_time(self) -> float:
        for raw in (self.folder / "input.jsonl").read_text().splitlines():
            line = orjson.loads(raw) if raw.strip() else {}
            if "at" in line or "tick" in line:
                return _t(line.get("at") or line["tick"]).timestamp()
        return 0.0

    def record(self, line: dict[str, Any]) -> Record:
        ref = SourceRef(self.ref.name, self.ref.system, line.get("site", self.ref.site))
        point_id = f"{line['asset']}/{line['point']}"
        data: dict[str, Any] = {"point": line["point"], "asset_remote_id": line["asset"]}
        if "event" in line:
            return Record.reading(
                ref, EntityType.EVENT, point_id, _t(line["at"]), data | line["event"]
            )
        data["value"] = line["value"]
        return Record.reading(ref, EntityType.METER_READING, point_id, _t(line["at"]), data)

    async def step(self, line: dict[str, Any]) -> None:
        assert self.out is not None
        if line.get("restart"):
            self.lines.append({"restarted": True})
            await self.start()
            return
        if line.get("fail_next_commit"):
            self.flaky.fail()  # the next append: disk full
            return
        if line.get("deliver"):
            await self.deliver()
            return
        if "tick" in line:
            await self.out.tick(_t(line["tick"]).timestamp())
        else:
            received = _t(line.get("received", line["at"])).timestamp()
            self.out.clock = lambda: received
            try:
                await self.out.append([self.record(line)])
            except OutboxWriteError:
                self.lines.append({"commit_failed": line["at"]})
                return
        await self.collect()

    async def collect(self) -> None:
        async with self.box._rdb.execute(
            "SELECT seq, body FROM records WHERE seq > ? ORDER BY seq", (self.seen,)
        ) as cur:
            rows = await cur.fetchall()
        for seq, body in rows:
            self.seen = max(self.seen, seq)
            env = orjson.loads(body)
            if is_rule_record(env):
                self.lines.append({"record": compact(env)})

    async def deliver(self) -> None:
        leased = await self.box.lease(100_000, 1 << 30)
        envs = [orjson.loads(item.body) for item in leased]
        await self.box.ack([item.seq for item in leased])
        self.lines.append(
            {
                "delivered": {
                    "records": len(envs),
                    "rule_records": [
                        [
                            e["entity_type"],
                            e["remote_id"],
                            e["data"].get("state") or e["data"].get("status"),
                        ]
                        for e in envs
                        if is_rule_record(e)
                    ],
                }
            }
        )

    async def run(self) -> list[dict[str, Any]]:
        async with self.box:
            await self.start()
            for raw in (self.folder / "input.jsonl").read_text().splitlines():
                if raw.strip():
                    await self.step(orjson.loads(raw))
            state = await self.box.cursors(self.ref.name)
        assert self.out is not None
        self.lines.append({"state": state})
        self.lines.append({"counters": dict(sorted(self.out.engine.counters.items()))})
        return self.lines
