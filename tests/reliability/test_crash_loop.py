"""Crash loop: SIGKILL the agent at random moments while every source is busy.

The agent runs as a subprocess with an MQTT source (sequence-numbered QoS 1 messages whose
payload carries the timestamp, so a redelivery keeps its id), a Modbus source (pymodbus's
server) and a SQL source (a PostgreSQL table that a writer keeps updating), and the
reference receiver (its own process) as upstream. It is killed ``RELIABILITY_KILLS``
times (20 here, 200 in ``scripts/soak``): half at a random moment of its start-up, half
at a random moment after its API is up. Between kills ``PRAGMA integrity_check`` runs on
the outbox file, and every record id the outbox holds is noted.

At the end, after one clean run:

* every published message is at the receiver (by its deterministic id), and the final
  version of every row;
* every record id ever seen in the outbox is at the receiver (committed means delivered);
* a message or row version is never stored under two ids (a duplicate delivery carries
  the identical id, which the receiver drops);
* per entity, records arrived in outbox order; the last start reports no recovery.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.agent_process import ModbusServerThread, modbus_source
from tests.helpers.agentproc import outbox_rows
from tests.helpers.mosquitto import Mosquitto
from tests.reliability.support import (
    DEADLINE,
    T0,
    Agent,
    PgSchema,
    PublisherThread,
    ReceiverProc,
    agent_config,
    integrity_check,
    kills,
    message,
    mqtt_source,
    reading_id,
    report,
    seeded,
    wait_until,
)

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


class RowWriter:
    """Inserts and updates ``wo`` rows in the background; remembers each final version."""

    def __init__(self, pg: PgSchema, rng: Any, rows: int = 40) -> None:
        self.pg = pg
        self.rng = rng
        self.rows = rows
        self.final: dict[str, int] = {}
        self.writes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> RowWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        if self.error is not None:
            raise AssertionError(f"row writer failed: {self.error!r}")

    def write(self, key: str) -> None:
        version = self.final.get(key, -1) + 1
        self.pg.execute(
            f'INSERT INTO "{self.pg.name}".wo VALUES ($1, $2, $3, clock_timestamp()) '
            "ON CONFLICT (wonum) DO UPDATE SET descr = excluded.descr, "
            "version = excluded.version, changed_at = excluded.changed_at",
            key,
            descr(key, version),
            version,
        )
        self.final[key] = version
        self.writes += 1

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.write(f"WO-{self.rng.randrange(self.rows):03d}")
                self._stop.wait(0.05)  # pacing the writer, not waiting for a condition
        except BaseException as exc:  # reported by stop()
            self.error = exc


def descr(key: str, version: int) -> str:
    return f"{key} version {version}"


def test_crash_loop(tmp_path: Path, mosquitto: Mosquitto) -> None:
    rng = seeded("crash loop")
    rx = ReceiverProc(tmp_path).start()
    pg = PgSchema()
    try:
        with ModbusServerThread({0: [7, 8]}) as modbus:
            config = agent_config(
                tmp_path,
                rx.url,
                sources={
                    "plant": mqtt_source(mosquitto.port, "rel-crash-agent"),
                    "meters": modbus_source(modbus.port, "100ms"),
                    "cmms": pg.source("200ms"),
                },
            )
            agent = Agent(tmp_path, config)
            try:
                figures = run_loop(agent, rx, pg, mosquitto, rng)
            finally:
                agent.kill()
    finally:
        rx.kill()
        pg.close()
    report("crash_loop", **figures)


def run_loop(
    agent: Agent, rx: ReceiverProc, pg: PgSchema, broker: Mosquitto, rng: Any
) -> dict[str, Any]:
    n = kills()
    seen: set[str] = set()  # every record id the outbox ever held
    # Subscribe once (the persistent session then queues messages while the agent is dead).
    agent.start()
    wait_until(lambda: agent.events("mqtt_subscribed"), "first MQTT subscription")
    with PublisherThread(broker.port, rate=150) as pub, RowWriter(pg, rng) as writer:
        for i in range(n):
            if agent.proc is None:
                agent.start()
            if i % 2:
                agent.wait_ready_sync()
            time.sleep(rng.uniform(0.0, 1.5))  # a random moment is the point here
            agent.kill()
            verdict = integrity_check(agent.outbox)
            assert verdict == "ok", f"outbox damaged after kill {i + 1}: {verdict}"
            ids = [r[0] for r in outbox_rows(agent.outbox, "SELECT id FROM records")]
            seen.update(ids)
        sent = pub.stop()
        writer.stop()
    # One clean run to the end: everything arrives, then a graceful stop.
    agent.start()
    agent.wait_ready_sync()
    expected = {reading_id(message(s)[0], T0 + s) for s in sent}
    wait_until(lambda: expected <= rx.ids(), "every published message at the receiver")
    wait_until(
        lambda: final_versions(rx) == writer.final,
        "final row versions at the receiver",
        detail=lambda: version_diff(final_versions(rx), writer.final),
    )
    wait_until(lambda: seen <= rx.ids(), "every record the outbox held at the receiver")
    wait_until(lambda: outbox_rows(agent.outbox, "SELECT count(*) FROM records")[0][0] == 0,
               "outbox drained")  # fmt: skip
    status = agent.status_sync()
    assert status["outbox"]["recovered_from"] is None
    assert status["outbox"]["dead_letters"] == 0
    assert agent.stop() == 0
    rows = rx.rows()
    check_ids_stable(rows)
    assert rx.order_violations() == []
    assert_versions_in_order(rows)
    modbus = [r for r in rows if r["source"]["name"] == "meters"]
    assert modbus, "Modbus readings reached the receiver"
    stats = rx.stats()
    return {
        "kills": n,
        "integrity_checks_ok": n,
        "messages_published": len(sent),
        "row_writes": writer.writes,
        "rows": len(writer.final),
        "modbus_readings": len(modbus),
        "records_at_receiver": len(rows),
        "records_checked": len(expected | seen) + len(writer.final),
        "lost": 0,
        "duplicates_dropped_by_receiver": stats["duplicates"],
        "dead_letters": 0,
        "deadline_s": DEADLINE,
    }


def final_versions(rx: ReceiverProc) -> dict[str, int]:
    """The version of the last-arrived record per work order at the receiver."""
    out: dict[str, int] = {}
    for r in rx.rows():
        if r["entity_type"] == "work_order":
            out[r["remote_id"]] = int(r["data"]["title"].rsplit(" ", 1)[1])
    return out


def version_diff(got: dict[str, int], want: dict[str, int]) -> str:
    diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    return f"(receiver, table) versions that differ: {dict(sorted(diff.items())[:20])}"


def check_ids_stable(rows: list[dict[str, Any]]) -> None:
    """One id per message and per row version: a redelivery must carry the same id."""
    ids: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rows:
        if r["entity_type"] == "meter_reading":
            ids[(r["remote_id"], r["observed_at"])].add(r["id"])
        elif r["entity_type"] == "work_order":
            ids[(r["remote_id"], r["data"]["title"])].add(r["id"])
    twice = {k: v for k, v in ids.items() if len(v) > 1}
    assert twice == {}, f"the same input stored under several ids: {list(twice.items())[:5]}"


def assert_versions_in_order(rows: list[dict[str, Any]]) -> None:
    """An older version never arrives after a newer one."""
    last: dict[str, int] = {}
    for r in rows:
        if r["entity_type"] != "work_order":
            continue
        version = int(r["data"]["title"].rsplit(" ", 1)[1])
        assert version > last.get(r["remote_id"], -1), f"{r['remote_id']} out of order"
        last[r["remote_id"]] = version
