"""Long outage: the upstream is unreachable while the outbox fills to its byte budget.

Time is compressed honestly: a small budget (``outbox.max_bytes = 48KiB``, about a hundred
readings) and a fast publisher stand in for a 1 GiB budget and days of a slow feed; the
code paths (admission, backpressure, drop-oldest) are the ones a real outage takes.

The upstream is the reference receiver's port with nothing listening (connection
refused) until it starts. The private mosquitto keeps ``max_queued_messages 100000``
(tests/helpers/mosquitto.py), far above what these runs publish, so the broker can hold
every message the agent does not acknowledge; in production size it for the longest
outage (docs/mqtt.md).

* ``when_full = "block"``: nothing is dropped. The outbox stays within its budget, the
  MQTT source stops acknowledging (the broker holds the rest), SQL reads pause; after
  recovery every message and every row's final version arrives, in order per entity.
* ``when_full = "drop_oldest"``: readings are dropped oldest-first, business records
  never; the drop counter equals exactly the number of messages missing at the
  receiver, and everything else arrives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers.mosquitto import Mosquitto
from tests.helpers.mqttpub import Publisher
from tests.reliability.support import (
    T0,
    Agent,
    PgSchema,
    ReceiverProc,
    agent_config,
    message,
    mqtt_source,
    reading_id,
    report,
    scale,
    wait_until,
)

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

BUDGET = 48 * 1024
ROWS = 20


def start_outage(tmp_path: Path, mosquitto: Mosquitto, when_full: str) -> tuple[Agent, Any]:
    pg = PgSchema()
    rx = ReceiverProc(tmp_path)  # not started: the WAN is down
    config = agent_config(
        tmp_path,
        rx.url,
        outbox={"max_bytes": BUDGET, "when_full": when_full},
        upstream={"batch_max_records": 20},
        sources={"plant": mqtt_source(mosquitto.port, f"rel-outage-{when_full}"),
                 "cmms": pg.source("200ms")},
    )  # fmt: skip
    agent = Agent(tmp_path, config).start()
    wait_until(lambda: agent.events("mqtt_subscribed"), "MQTT subscribed")
    return agent, (pg, rx)


def insert_rows(pg: PgSchema) -> dict[str, str]:
    """Business records created during the outage (work orders), and their titles."""
    rows = {f"WO-{i:03d}": f"outage order {i}" for i in range(ROWS)}
    for key, title in rows.items():
        pg.execute(f'INSERT INTO "{pg.name}".wo VALUES ($1, $2, 0, clock_timestamp())', key, title)
    return rows


def titles(rx: ReceiverProc) -> dict[str, str]:
    return {
        r["remote_id"]: r["data"]["title"] for r in rx.rows() if r["entity_type"] == "work_order"
    }


def publish(port: int, n: int) -> list[int]:
    with Publisher(port) as pub:
        pub.publish_many(message(s)[1:] for s in range(n))
    return list(range(n))


def plant(agent: Agent) -> dict[str, Any]:
    source: dict[str, Any] = agent.status_sync()["sources"]["plant"]
    return source


def sample_budget(agent: Agent, peaks: list[int]) -> dict[str, Any]:
    status = agent.status_sync()
    peaks.append(status["outbox"]["total_bytes"])
    return status


def test_outage_block_drops_nothing(tmp_path: Path, mosquitto: Mosquitto) -> None:
    n = int(1000 * scale())
    agent, (pg, rx) = start_outage(tmp_path, mosquitto, "block")
    peaks: list[int] = []
    try:
        sent = publish(mosquitto.port, n)  # the broker has them all (PUBACK to the publisher)
        rows = insert_rows(pg)
        wait_until(lambda: agent.events("outbox_full_backpressure"), "backpressure")
        # The agent holds what fits and no more: the broker keeps the rest unacknowledged.
        wait_until(lambda: sample_budget(agent, peaks)["outbox"]["blocked_appends"] > 0,
                   "an append waiting for room")  # fmt: skip
        status = sample_budget(agent, peaks)
        committed = status["sources"]["plant"]["records"]
        assert committed < n, "the outbox cannot hold every message within its budget"
        assert status["outbox"]["dropped"] == {}
        assert status["upstream"]["state"] == "retrying"
        ready = agent.get_sync("/readyz")
        assert ready is not None
        assert ready.status_code == 503
        for _ in range(20):  # it stays within budget while the outage lasts
            sample_budget(agent, peaks)
        assert max(peaks) <= BUDGET, f"outbox held {max(peaks)} bytes, budget {BUDGET}"
        rx.start()  # the WAN is back
        # (After recovery an append larger than the budget is admitted into an EMPTY
        # outbox, by design: otherwise a batch bigger than the budget would wait forever.)
        expected = {reading_id(message(s)[0], T0 + s) for s in sent}
        wait_until(lambda: expected <= rx.ids(), "every message at the receiver")
        wait_until(lambda: titles(rx) == rows, "every row at the receiver")
        final = agent.status_sync()["outbox"]
        assert final["dropped"] == {}
        assert agent.stop() == 0
        assert rx.order_violations() == []
        report(
            "long_outage_block",
            budget_bytes=BUDGET,
            messages=n,
            rows=ROWS,
            held_by_agent_at_peak=committed,
            peak_outbox_bytes=max(peaks),
            lost=0,
            dropped=0,
            duplicates_dropped_by_receiver=rx.stats()["duplicates"],
        )
    finally:
        agent.kill()
        rx.kill()
        pg.close()


def test_outage_drop_oldest_counts_every_drop(tmp_path: Path, mosquitto: Mosquitto) -> None:
    n = int(1000 * scale())
    agent, (pg, rx) = start_outage(tmp_path, mosquitto, "drop_oldest")
    try:
        sent = publish(mosquitto.port, n)
        rows = insert_rows(pg)
        # Readings never wait in drop_oldest mode: every message gets committed (or dropped).
        wait_until(lambda: plant(agent)["counters"].get("committed_messages", 0) >= n,
                   "all consumed", detail=lambda: plant(agent))  # fmt: skip
        wait_until(lambda: agent.status_sync()["sources"]["cmms"]["records"] >= ROWS, "rows read")
        status = agent.status_sync()["outbox"]
        dropped = status["dropped"].get("over_budget", 0)
        assert dropped > 0
        assert status["total_bytes"] <= BUDGET
        rx.start()
        by_id = {reading_id(message(s)[0], T0 + s): s for s in sent}
        wait_until(lambda: titles(rx) == rows, "every business record (never dropped)")

        def settled() -> bool:
            return agent.status_sync()["outbox"]["total_rows"] == 0

        wait_until(settled, "outbox drained")
        assert agent.status_sync()["outbox"]["dropped"].get("over_budget", 0) == dropped
        got = rx.ids()
        missing = sorted(s for i, s in by_id.items() if i not in got)
        assert len(missing) == dropped, "the drop counter equals what is missing upstream"
        # Oldest first: one contiguous run of the oldest unleased messages, not scattered.
        assert missing == list(range(missing[0], missing[0] + len(missing)))
        assert all(s in by_id.values() for s in missing)
        assert agent.stop() == 0
        assert rx.order_violations() == []
        report(
            "long_outage_drop_oldest",
            budget_bytes=BUDGET,
            messages=n,
            rows=ROWS,
            dropped_counted=dropped,
            missing_at_receiver=len(missing),
            first_dropped=missing[0],
            business_dropped=0,
            lost_uncounted=0,
        )
    finally:
        agent.kill()
        rx.kill()
        pg.close()
