"""``edge-agent demo``: the whole job on a simulated building, on 127.0.0.1, in a minute.

Starts a private MQTT broker (mosquitto), a Modbus gateway with a lift controller and an
energy meter, an IoT feed, a CMMS database (SQLite) that changes while it runs, the
reference receiver as the upstream, and the agent itself on a generated config (printed,
so it can be learned from). Shows live progress; ``--outage`` cuts the upstream for a
while to show buffering and catch-up; at the end every record the simulators produced is
checked at the receiver (``lost`` must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from agent.demo.building import Cmms, ModbusPlant, MqttFeed, observation_key
from agent.demo.procs import Processes, find_mosquitto

TOKEN = "demo-upstream-token"  # noqa: S105 - a throwaway token for a loopback-only demo
API_TOKEN = "demo-api-token"  # noqa: S105


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent_config(d: Path, ports: dict[str, int]) -> str:
    """The agent's config for the demo site (written to the temp dir and printed)."""
    return f"""# edge-agent demo configuration (generated; see config.example.toml for every option)
[agent]
id = "demo-gateway"
site = "demo-tower"
state_dir = "{d / "state"}"

[logging]
level = "warning"
format = "json"

[outbox]
max_bytes = "64MiB"
when_full = "block"

[upstream]
url = "http://127.0.0.1:{ports["receiver"]}"
token = "{TOKEN}"
backoff_initial = "200ms"
backoff_cap = "2s"
batch_max_records = 500
drain_timeout = "10s"

[api]
listen = "127.0.0.1:{ports["api"]}"
token = "{API_TOKEN}"

# Lift controller (unit 1) and energy meter (unit 2) behind one Modbus TCP gateway.
[sources.lift-modbus]
type = "modbus"
[sources.lift-modbus.connections.gateway]
transport = "tcp"
host = "127.0.0.1"
port = {ports["modbus"]}
timeout = "1s"

[sources.lift-modbus.devices.lift-1]
connection = "gateway"
unit_id = 1
interval = "1s"
asset = "LIFT-1"
[[sources.lift-modbus.devices.lift-1.points]]
name = "trips"
address = 0
type = "uint32"
[[sources.lift-modbus.devices.lift-1.points]]
name = "door_cycles"
address = 2
type = "uint32"
[[sources.lift-modbus.devices.lift-1.points]]
name = "car_position"
address = 4
type = "int16"
[[sources.lift-modbus.devices.lift-1.points]]
name = "motor_temp"
address = 5
type = "int16"
scale = 0.1
unit = "degC"
rbe = {{ deadband = 0.5, max_interval = "30s" }}

[sources.lift-modbus.devices.energy-meter]
connection = "gateway"
unit_id = 2
interval = "2s"
asset = "MTR-1"
[[sources.lift-modbus.devices.energy-meter.points]]
name = "active_energy"
address = 0
type = "uint32"
scale = 0.1
unit = "kWh"
[[sources.lift-modbus.devices.energy-meter.points]]
name = "power"
address = 2
type = "uint16"
unit = "W"
[[sources.lift-modbus.devices.energy-meter.points]]
name = "voltage"
address = 3
type = "uint16"
scale = 0.1
unit = "V"
rbe = {{ deadband = 1.0 }}

# IoT sensors on MQTT: escalator vibration and air handling unit temperatures.
[sources.iot-mqtt]
type = "mqtt"
host = "127.0.0.1"
port = {ports["mqtt"]}
client_id = "edge-agent-demo"

[[sources.iot-mqtt.subscriptions]]
topic = "site/{{site}}/escalator/{{asset}}/telemetry"
entity = "meter_reading"
asset = "{{asset}}"
timestamp_path = "ts"
timestamp_format = "ms"
[[sources.iot-mqtt.subscriptions.points]]
name = "vibration"
path = "vibration_mm_s"
type = "float"
unit = "mm/s"
[[sources.iot-mqtt.subscriptions.points]]
name = "step_speed"
path = "step_speed_m_s"
type = "float"
unit = "m/s"

[[sources.iot-mqtt.subscriptions]]
topic = "site/{{site}}/hvac/{{asset}}/telemetry"
entity = "meter_reading"
asset = "{{asset}}"
timestamp_path = "ts"
timestamp_format = "ms"
[[sources.iot-mqtt.subscriptions.points]]
name = "supply_temp"
path = "supply_temp"
type = "float"
unit = "degC"

# The CMMS database, read incrementally through the declarative SQL profile.
[sources.cmms]
type = "sql"
profile = "declarative"
url = "sqlite+aiosqlite:///{d / "cmms.db"}"
interval = "2s"
reconcile_interval = "20s"

[sources.cmms.entities.work_orders]
entity_type = "work_order"
table = "work_orders"
key = ["wo_id"]
cursor = "updated_at"
[sources.cmms.entities.work_orders.fields]
title = "title"
status = "status"
priority = "priority"
asset_remote_id = "asset_id"

[sources.cmms.entities.assets]
entity_type = "asset"
table = "assets"
key = ["asset_id"]
cursor = "updated_at"
[sources.cmms.entities.assets.fields]
name = "name"
status = "status"
location_remote_id = "location"
"""


class Demo:
    """Runs the demo site and reports."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)  # noqa: S311 - simulation, not crypto
        self.dir = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
        self.ports = {k: free_port() for k in ("mqtt", "modbus", "receiver", "api")}
        self.procs = Processes(self.dir)
        self.stop = asyncio.Event()
        self.http = httpx.AsyncClient(timeout=5)
        self.started = time.monotonic()
        self.outage: tuple[float, float] | None = None
        self.upstream_down = False

    def say(self, text: str = "") -> None:
        """Progress for humans: on stderr with --json, so stdout stays one JSON object."""
        print(text, file=sys.stderr if self.args.json else sys.stdout, flush=True)

    async def run(self) -> int:
        """Start everything, run for --duration, verify, stop; returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        try:
            return await self._run()
        except RuntimeError as exc:  # a child did not start: say which, keep its logs
            self.say(f"error: {exc}")
            self.args.keep = True
            return 1
        finally:
            await self.procs.stop_all()
            await self.http.aclose()
            if not self.args.keep:
                shutil.rmtree(self.dir, ignore_errors=True)

    async def _run(self) -> int:
        mosquitto = find_mosquitto()
        if mosquitto is None:
            self.say(
                "error: the demo needs the mosquitto MQTT broker; install it with\n"
                "    sudo apt-get install mosquitto\n(scripts/bootstrap does this as root)"
            )
            return 2
        config = agent_config(self.dir, self.ports)
        (self.dir / "config.toml").write_text(config)
        self.say(f"demo directory: {self.dir}")
        if self.args.show_config:
            self.say("---- generated agent config (" + str(self.dir / "config.toml") + ") ----")
            self.say(config)
            self.say("----")
        await self.procs.start_mosquitto(mosquitto, self.ports["mqtt"])
        plant = ModbusPlant(self.ports["modbus"], self.rng)
        await plant.start()
        cmms = Cmms(self.dir / "cmms.db", self.rng)
        feed = MqttFeed(self.ports["mqtt"], "iot-mqtt", self.rng)
        await self._start_receiver()
        await self.procs.start_agent(self.dir / "config.toml", self.ports["api"])
        # MQTT routes a message only to subscriptions that exist when it is published: a
        # brand-new agent never sees what was published before its first SUBSCRIBE (its
        # persistent session covers every later outage). The feed waits for that moment,
        # or its first messages would count as "lost" while no agent could have had them.
        await self._wait_for_mqtt_subscription()
        self.say(f"status page:     http://127.0.0.1:{self.ports['api']}/  (open it in a browser)")
        self.say(f"agent status:    http://127.0.0.1:{self.ports['api']}/v1/status")
        self.say(
            f"upstream stats:  http://127.0.0.1:{self.ports['receiver']}/v1/stats  (token {TOKEN})"
        )
        if self.args.outage:
            begin = max(3.0, self.args.duration / 3)
            self.outage = (begin, begin + self.args.outage)
        sims = [
            asyncio.create_task(feed.run(self.stop)),
            asyncio.create_task(self._tick(plant, cmms)),
        ]
        try:
            await self._progress_until_done()
        finally:
            self.stop.set()
            await asyncio.gather(*sims, return_exceptions=True)
        interrupted = time.monotonic() - self.started < self.args.duration
        if self.upstream_down:
            await self._start_receiver()
        summary = await self._settle_and_check(feed, cmms, interrupted)
        await plant.stop()
        if interrupted:
            return self._report_interrupted(summary)
        return self._report(summary)

    async def _wait_for_mqtt_subscription(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await self._agent_status()
            if status and status["sources"].get("iot-mqtt", {}).get("state") == "ok":  # subscribed
                return
            if self.procs.died():
                break
            await asyncio.sleep(0.05)
        raise RuntimeError(
            f"the agent's MQTT source did not subscribe within {timeout:.0f}s; "
            f"see {self.dir}/agent.log"
        )

    async def _start_receiver(self) -> None:
        await self.procs.start_receiver(self.ports["receiver"], self.dir / "receiver.db", TOKEN)
        self.upstream_down = False

    async def _tick(self, plant: ModbusPlant, cmms: Cmms) -> None:
        n = 0
        while not self.stop.is_set():
            await plant.tick()
            n += 1
            if n % 3 == 0:
                await asyncio.to_thread(cmms.tick)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self.stop.wait()

    async def _progress_until_done(self) -> None:
        while not self.stop.is_set():
            elapsed = time.monotonic() - self.started
            if elapsed >= self.args.duration:
                return
            await self._outage_step(elapsed)
            await self._print_progress(elapsed)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.stop.wait()
            if self.procs.died():
                self.say(f"error: {self.procs.died()} exited unexpectedly; see {self.dir}")
                self.args.keep = True
                return

    async def _outage_step(self, elapsed: float) -> None:
        if self.outage is None:
            return
        begin, end = self.outage
        if begin <= elapsed < end and not self.upstream_down:
            self.say(
                f"--- upstream outage: the receiver is stopped for {self.args.outage:.0f}s"
                " (the agent keeps buffering) ---"
            )
            await self.procs.stop("receiver")
            self.upstream_down = True
        elif elapsed >= end and self.upstream_down:
            self.say("--- upstream back: watch the outbox drain ---")
            await self._start_receiver()

    async def _agent_status(self) -> dict[str, Any] | None:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = await self.http.get(f"http://127.0.0.1:{self.ports['api']}/v1/status")
            return dict(r.json())
        return None

    async def _receiver_stats(self) -> dict[str, Any] | None:
        if self.upstream_down:
            return None
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = await self.http.get(
                f"http://127.0.0.1:{self.ports['receiver']}/v1/stats",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            return dict(r.json())
        return None

    async def _print_progress(self, elapsed: float) -> None:
        status = await self._agent_status()
        stats = await self._receiver_stats()
        if status is None:
            self.say(f"[{elapsed:4.0f}s] agent starting...")
            return
        read = "  ".join(f"{n} {s.get('records', 0)}" for n, s in status["sources"].items())
        box = status["outbox"]
        up = status.get("upstream", {}).get("state", "?")
        delivered = "down" if stats is None else str(stats.get("records", 0))
        self.say(
            f"[{elapsed:4.0f}s] read: {read} | outbox {box['total_rows']} queued"
            f" | upstream {up}, holds {delivered}"
        )

    async def _settle_and_check(
        self, feed: MqttFeed, cmms: Cmms, interrupted: bool
    ) -> dict[str, Any]:
        """Wait (bounded) until the agent has delivered everything, then compare."""
        deadline = time.monotonic() + (5 if interrupted else 60)
        expected_rows = await asyncio.to_thread(cmms.snapshot)
        check: dict[str, Any] = {}
        while True:
            check = await self._check(feed, expected_rows)
            if check["lost"] == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
        await self.procs.stop("agent")
        return check

    async def _fetch_all(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        base = f"http://127.0.0.1:{self.ports['receiver']}/v1/records"
        while True:
            params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
            r = await self.http.get(
                base, params=params, headers={"Authorization": f"Bearer {TOKEN}"}
            )
            page = orjson.loads(r.content)
            out += page["records"]
            cursor = page.get("next_cursor")
            if not cursor:
                return out

    async def _check(self, feed: MqttFeed, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
        records = await self._fetch_all()
        status = await self._agent_status() or {"sources": {}}
        latest: dict[str, dict[str, Any]] = {}
        per: dict[str, dict[str, int]] = {}
        for r in sorted(records, key=lambda r: r.get("seq", 0)):
            src = r["source"]["name"]
            per.setdefault(src, {}).setdefault(r["entity_type"], 0)
            per[src][r["entity_type"]] += 1
            if src == "cmms":
                latest[f"{r['entity_type']}:{r['remote_id']}"] = r["data"]
        seen = {
            observation_key(r["remote_id"], r["observed_at"])
            for r in records
            if r["source"]["name"] == feed.source
        }
        mqtt_missing = sorted(feed.expected - seen)
        sql_stale = [
            k
            for k, want in rows.items()
            if any(latest.get(k, {}).get(f) != v for f, v in want.items())
        ]
        modbus_read = status["sources"].get("lift-modbus", {}).get("records", 0)
        modbus_got = sum(per.get("lift-modbus", {}).values())
        stats = await self._receiver_stats() or {}
        return {
            "delivered": per,
            "duplicates_at_upstream": stats.get("duplicates", 0),
            "produced": {
                "mqtt_messages": feed.published,
                "mqtt_malformed": feed.malformed,
                "mqtt_records_expected": len(feed.expected),
                "cmms_changes": len(rows),
                "modbus_records_read": modbus_read,
            },
            "missing": {
                "mqtt": len(mqtt_missing),
                "cmms": len(sql_stale),
                "modbus": max(0, modbus_read - modbus_got),
            },
            "lost": len(mqtt_missing) + len(sql_stale) + max(0, modbus_read - modbus_got),
            "quarantined": {n: s.get("quarantined", 0) for n, s in status["sources"].items()},
            # the MQTT source's own counters (received, committed, acked): tell a message
            # the broker never delivered from one the agent lost
            "mqtt_source_counters": status["sources"].get("iot-mqtt", {}).get("counters"),
            "examples_missing": (mqtt_missing + sql_stale)[:5],
        }

    def _report_interrupted(self, s: dict[str, Any]) -> int:
        """Ctrl-C: show what got through, but no verdict: the run was cut short, and what
        is not delivered yet is still in the outbox or the source, not lost."""
        s["interrupted"] = True
        if self.args.json:
            print(orjson.dumps(s, option=orjson.OPT_SORT_KEYS).decode())
        else:
            self.say("")
            self.say("interrupted: delivered so far, per source and entity type:")
            for src, types in sorted(s["delivered"].items()):
                self.say(f"  {src:<12} " + ", ".join(f"{t} {n}" for t, n in sorted(types.items())))
            self.say(
                "(no loss check on an interrupted run: undelivered records wait in the "
                "outbox; run without Ctrl-C for the full check)"
            )
        return 130

    def _report(self, s: dict[str, Any]) -> int:
        ok = s["lost"] == 0 and all(
            s["delivered"].get(n) for n in ("lift-modbus", "iot-mqtt", "cmms")
        )
        s["outage_seconds"] = self.args.outage or 0
        s["ok"] = ok
        if self.args.json:
            print(orjson.dumps(s, option=orjson.OPT_SORT_KEYS).decode())
        else:
            self.say("")
            self.say("delivered to the upstream, per source and entity type:")
            for src, types in sorted(s["delivered"].items()):
                self.say(f"  {src:<12} " + ", ".join(f"{t} {n}" for t, n in sorted(types.items())))
            self.say(f"duplicates dropped by the upstream: {s['duplicates_at_upstream']}")
            self.say(f"quarantined bad inputs: {s['quarantined']}")
            self.say(f"lost: {s['lost']}  ({'OK' if ok else 'NOT OK'})")
        return 0 if ok else 1


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edge-agent demo``."""
    return asyncio.run(Demo(args).run())
