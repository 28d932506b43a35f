"""Every metric family docs/operations.md lists exists on /metrics and moved, after a real
run with all three source kinds delivering to the reference receiver.

The list of families is read from the table in docs/operations.md ("### Metrics"), so
docs and code cannot drift: a family in the docs but not served fails, and so does a
served ``edge_agent_*`` family the docs do not list. The run: an MQTT source on a private
mosquitto (one malformed message, quarantined), a Modbus source polling pymodbus's server
(plus a device on a port nobody serves: its failed polls move the failure counter), an
SQL source on SQLite (a row edited without its change column and one deleted, for the
reconciliation families), and the reference receiver refusing one record (a dead letter)
and answering its first request too late (the retry meets duplicates).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.receiver import Faults, running_receiver
from tests.agent_harness import running_agent, settings_for
from tests.agent_process import ModbusServerThread, modbus_source
from tests.helpers.cmms import declarative_source, sqlite_cmms
from tests.helpers.mosquitto import Mosquitto
from tests.helpers.mqttpub import Publisher

DOC = Path(__file__).parents[1] / "docs" / "operations.md"
TOKEN = "metrics-upstream-token"

# Families a healthy run cannot move, and what would: they must exist, not move.
CANNOT_MOVE = {
    "edge_agent_dropped_total": "retention drops need drop_oldest over the byte budget",
    "edge_agent_outbox_write_errors_total": "needs a failing disk",
    "edge_agent_source_inputs_dropped_total": "needs MQTT QoS 0 beyond max_held_bytes",
    "edge_agent_source_restarts_total": "needs a source that crashes",
    "edge_agent_device_overruns_total": "needs a poll longer than its interval",
    "edge_agent_outbox_blocked_appends": "needs a full outbox (0 is its healthy value)",
    "edge_agent_outbox_disk_free_bytes": "moves only as the filesystem fills or empties",
    "edge_agent_outbox_disk_reserve_bytes": "fixed by outbox.disk_reserve and the disk size",
    "edge_agent_outbox_disk_low": "needs a nearly full disk (0 is its healthy value)",
    "edge_agent_outbox_oldest_age_seconds": "0 once everything is delivered",
    "edge_agent_outbox_rows": "0 once everything is delivered",
    "edge_agent_outbox_bytes": "0 once everything is delivered",
    "edge_agent_buffer_horizon_measuring": "0 once api.horizon_min_sample is measured",
}


def documented() -> dict[str, str]:
    """``{family: type}`` from the metric table of docs/operations.md."""
    text = DOC.read_text()
    section = text[text.index("### Metrics") :]
    section = section[: section.index("\n#", 1)]
    rows = re.findall(r"^\| `(edge_agent_[a-z_]+)` \| (gauge|counter) \|", section, re.M)
    return dict(rows)


def test_the_docs_table_is_read() -> None:
    families = documented()
    assert len(families) >= 20, families
    assert families["edge_agent_device_up"] == "gauge"
    assert all(not n.endswith("_total") for n, t in families.items() if t == "gauge")


def sources(tmp: Path, broker: int, modbus: int) -> dict[str, Any]:
    meters = modbus_source(modbus)
    meters["devices"]["gone"] = {  # a unit id the simulator does not serve: no answer
        "connection": "c",
        "unit_id": 7,
        "interval": "200ms",
        "points": [{"name": "energy", "address": 0}],
    }
    return {
        "feed": {
            "type": "mqtt",
            "host": "127.0.0.1",
            "port": broker,
            "client_id": "metrics-agent",
            "subscriptions": [
                {"topic": "site/{asset}/load", "points": [{"name": "load", "path": "kg"}]}
            ],
        },
        "meters": meters,
        # Passes and content reconciliations every second: an edit that leaves the cursor
        # alone (a drift) and a hard delete are found within the run.
        "cmms": declarative_source(
            sqlite_cmms(tmp / "cmms.db"), interval="1s", reconcile_interval="1s"
        ),
    }


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Family name (with ``_total`` for counters, as exposed) -> its samples."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        name = f"{family.name}_total" if family.type == "counter" else family.name
        out[name] = [(s.labels, s.value) for s in family.samples if not s.name.endswith("_created")]
    return out


@pytest.mark.slow
async def test_every_documented_metric_exists_and_moves(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    # One record refused (a dead letter); the first answer comes after the agent gave up
    # waiting (read_timeout), so its retry meets records the upstream already holds.
    faults = Faults(reject_pattern="WO-3", latency=3.0, latency_count=1)
    try:
        with ModbusServerThread() as modbus:
            async with running_receiver(tmp_path / "rx.db", TOKEN, faults=faults) as rx:
                settings = settings_for(
                    tmp_path,
                    upstream={
                        "url": rx.url,
                        "token": TOKEN,
                        "backoff_cap": "1s",
                        "read_timeout": "1s",
                    },
                    sources=sources(tmp_path, broker.port, modbus.port),
                    api={"horizon_min_sample": "1s"},  # the horizon families, known
                )
                async with running_agent(settings) as agent:
                    await moved(agent, broker.port, tmp_path / "cmms.db")
                    async with httpx.AsyncClient() as http:
                        scraped = await http.get(f"http://{settings.api.listen}/metrics")
    finally:
        broker.stop()
    assert scraped.status_code == 200
    got = samples(scraped.text)
    docs = documented()
    missing = sorted(set(docs) - set(got))
    assert not missing, f"documented but not served: {missing}"
    undocumented = sorted(n for n in got if n.startswith("edge_agent_") and n not in docs)
    assert not undocumented, f"served but not in docs/operations.md: {undocumented}"
    still = sorted(
        name
        for name in docs
        if name not in CANNOT_MOVE and not any(value > 0 for _, value in got[name])
    )
    assert not still, f"documented families that did not move in a real run: {still}"
    # The per-device family tells the answering device from the silent one.
    up = {labels["device"]: value for labels, value in got["edge_agent_device_up"]}
    polls = {labels["device"]: value for labels, value in got["edge_agent_device_polls_total"]}
    assert up["meter"] == 1.0
    assert polls["meter"] > 0


def publish(port: int) -> None:
    with Publisher(port) as pub:
        for i in range(5):
            pub.publish(f"site/L{i}/load", f'{{"kg": {100 + i}}}')
        pub.publish("site/L9/load", b"not json")  # quarantined


def edit_behind_the_cursor(db: Path) -> None:
    """What no feed sees: a row changed without its change column, and one deleted."""
    con = sqlite3.connect(db)
    con.execute("UPDATE wo SET descr = 'edited in place' WHERE wonum = 'WO-1'")
    con.execute("DELETE FROM wo WHERE wonum = 'WO-2'")
    con.commit()
    con.close()


def reconciled(st: dict[str, Any]) -> dict[str, Any]:
    entity = st["sources"]["cmms"].get("entities", {}).get("work_orders", {})
    rec: dict[str, Any] = entity.get("reconcile") or {}
    return rec


async def moved(agent: Any, broker: int, db: Path) -> None:
    """Until every source produced, the upstream accepted and rejected, and the silent
    Modbus device failed (bounded: a loaded CI machine is slow, not a timing assert).
    MQTT messages are published until some arrive: the ones sent before the agent's
    subscription exists are not kept by the broker."""

    def ready(st: dict[str, Any]) -> bool:
        src, up, box = st["sources"], st["upstream"]["records"], st["outbox"]
        gone = src["meters"].get("devices", {}).get("gone", {})  # none before its start
        return (
            all(src[n]["records"] > 0 for n in ("feed", "meters", "cmms"))
            and src["feed"]["quarantined"] > 0
            and up["accepted"] > 0
            and up["rejected"] > 0
            and up["duplicates"] > 0
            and box["dead_letters"] > 0
            and gone.get("failures", 0) > 0
            and gone.get("state") == "retrying"  # demoted or offline
            and (reconciled(st).get("totals") or {}).get("drifts", 0) > 0
            and (reconciled(st).get("totals") or {}).get("deletes", 0) > 0
        )

    st: dict[str, Any] = {}
    try:
        async with asyncio.timeout(120):
            edited = False
            while not ready(st := await agent.status()):
                if not edited and reconciled(st).get("last_reconcile_at"):
                    await asyncio.to_thread(edit_behind_the_cursor, db)
                    edited = True
                if st["sources"]["feed"]["records"] == 0 and st["sources"]["feed"].get("connected"):
                    await asyncio.to_thread(publish, broker)
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"not all moved: {st}") from None
