"""The upstream fault matrix, end to end: the daemon as a subprocess, fed by MQTT.

One agent (an MQTT source, the upstream token in a ``token_file``) and one reference
receiver process go through every answer of docs/upstream.md in turn: 500, 502, 503,
429 with ``Retry-After``, 401 then a new token by SIGHUP, 403, 413, 400 with a poison
record, connection refused, read timeout. During each fault a fresh batch of sequence-
numbered messages is published on seven assets. At the end every message is at the
receiver except the poison ones, which are dead letters with their reason; per entity
the records arrived in outbox order; no record is stored twice.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agentproc import outbox_rows
from tests.helpers.mosquitto import Mosquitto
from tests.helpers.mqttpub import Publisher
from tests.reliability.support import (
    T0,
    TOKEN,
    Agent,
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

PER_STEP = int(70 * scale())
NEW_TOKEN = "rel-rotated-token"
POISON_ASSET = "A3"


class Matrix:
    """Publishes one batch per fault and remembers what must arrive."""

    def __init__(self, agent: Agent, rx: ReceiverProc, broker: Mosquitto) -> None:
        self.agent, self.rx, self.broker = agent, rx, broker
        self.next = 0
        self.expected: set[str] = set()
        self.poison: set[str] = set()
        self.steps: list[str] = []

    def publish(self, poison: bool = False) -> set[str]:
        seqs = range(self.next, self.next + PER_STEP)
        self.next += PER_STEP
        with Publisher(self.broker.port) as pub:
            pub.publish_many(message(s)[1:] for s in seqs)
        ids = {reading_id(message(s)[0], T0 + s): message(s)[0] for s in seqs}
        bad = {i for i, asset in ids.items() if poison and asset == POISON_ASSET}
        self.poison |= bad
        self.expected |= set(ids) - bad
        return set(ids) - bad

    def arrived(self, ids: set[str], what: str) -> None:
        wait_until(lambda: ids <= self.rx.ids(), what,
                   detail=lambda: f"{len(ids - self.rx.ids())} of {len(ids)} missing")  # fmt: skip
        self.agent.check_alive()
        self.steps.append(what)

    def upstream(self) -> dict[str, Any]:
        result: dict[str, Any] = self.agent.status_sync()["upstream"]
        return result

    def until(self, condition: Callable[[dict[str, Any]], bool], what: str) -> None:
        wait_until(lambda: condition(self.upstream()), what, detail=self.upstream)


def test_fault_matrix_end_to_end(tmp_path: Path, mosquitto: Mosquitto) -> None:
    rx = ReceiverProc(tmp_path).start()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    config = agent_config(tmp_path, rx.url,
                          upstream={"read_timeout": "2s", "batch_max_records": 25,
                                    "gzip_min_bytes": "1MiB"},
                          sources={"plant": mqtt_source(mosquitto.port, "rel-faults")})  # fmt: skip
    del config["upstream"]["token"]
    config["upstream"]["token_file"] = str(token_file)
    agent = Agent(tmp_path, config).start()
    m = Matrix(agent, rx, mosquitto)
    try:
        wait_until(lambda: agent.events("mqtt_subscribed"), "MQTT subscribed")
        m.arrived(m.publish(), "baseline")
        for status in (500, 502, 503):
            rx.faults(reset=True, status=status, status_count=3)
            m.arrived(m.publish(), f"after {status} x3")
        rx.faults(reset=True, status=429, status_count=2, retry_after="1")
        m.arrived(m.publish(), "after 429 with Retry-After")
        reauthorize_by_sighup(m, token_file)
        rx.faults(reset=True, status=403, status_count=2)
        ids = m.publish()
        m.until(lambda up: up["reason"] == "forbidden", "403 seen as forbidden")
        m.arrived(ids, "after 403 (probe succeeds)")
        rx.faults(reset=True, max_body_bytes=3000)
        m.arrived(m.publish(), "after 413 (batches split)")
        assert m.upstream()["splits"] > 0
        rx.faults(reset=True, reject_pattern=f"^{POISON_ASSET}/", reject_mode="batch")
        m.arrived(m.publish(poison=True), "after 400 poison (bisected)")
        wait_until(lambda: dead_ids(agent) == m.poison, "poison records dead-lettered")
        rx.faults(reset=True)
        rx.kill()
        ids = m.publish()
        m.until(lambda up: up["state"] == "retrying", "connection refused seen")
        rx.start()
        m.arrived(ids, "after connection refused")
        rx.faults(reset=True, latency=3.0, latency_count=2)
        m.arrived(m.publish(), "after read timeouts")
        rx.faults(reset=True)
        wait_until(lambda: outbox_rows(agent.outbox, "SELECT count(*) FROM records")[0][0] == 0,
                   "outbox drained")  # fmt: skip
        up = m.upstream()
        stats = rx.stats()
        assert agent.stop() == 0
    finally:
        agent.kill()
        rx.kill()
    got = rx.ids()
    assert m.expected <= got, f"{len(m.expected - got)} lost"
    assert not (m.poison & got), "poison records never stored upstream"
    assert rx.order_violations() == []
    report(
        "fault_matrix",
        steps=m.steps,
        messages=m.next,
        delivered=len(m.expected),
        dead_lettered_poison=len(m.poison),
        lost=0,
        order_violations=0,
        receiver_requests=stats["requests"],
        duplicates_dropped_by_receiver=stats["duplicates"],
        agent_retries=up["retries"],
        splits=up["splits"],
        bisections=up["bisections"],
    )


def reauthorize_by_sighup(m: Matrix, token_file: Path) -> None:
    """401: the agent keeps buffering; a new token file and SIGHUP resume delivery."""
    m.rx.faults(reset=True, token=NEW_TOKEN)
    m.rx.token = NEW_TOKEN  # what a restarted receiver expects too
    ids = m.publish()
    m.until(lambda up: up["state"] == "reauthorization_required", "401 seen")
    assert not (ids & m.rx.ids()), "nothing is accepted with the old token"
    token_file.write_text(NEW_TOKEN)
    m.agent.send(signal.SIGHUP)
    m.arrived(ids, "after 401 and a new token by SIGHUP")
    m.until(lambda up: up["state"] == "ok", "upstream ok again")


def dead_ids(agent: Agent) -> set[str]:
    return {r[0] for r in outbox_rows(agent.outbox, "SELECT id FROM dead_letters")}
