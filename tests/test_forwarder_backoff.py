"""Every retry path of the forwarder goes through the backoff.

Against the real receiver made to refuse everything (413 to every body, 400 to every
batch, or a 200 that never names the records), the requests it receives in a window are
counted and compared with the most the backoff schedule allows there. The count is an
upper bound: a slow, loaded machine only makes fewer requests, never more.

The schedule: full jitter, delay i uniform in [0, min(cap, initial * 2**i)]. Past the
ramp (RAMP delays up to the cap) each delay averages cap/2, so a window of W seconds
holds about RAMP + W / (cap/2) requests; the bound allows twice that. Exceeding it needs
~50 delays at the cap to sum below W when they average 2 W: about 1e-9 (sum of uniforms,
normal approximation), while a path that skips the backoff sends all 127 requests a
64-record batch needs to be dead-lettered within the first second, or (answer
incomplete, backoff reset by every 200) ~30 requests a second.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from upstream_support import (  # fixtures are used by name
    SOURCE,
    make_records,
    make_settings,
    outbox_fixture,  # noqa: F401
    receiver_fixture,  # noqa: F401
)

from agent.forwarder import Forwarder
from agent.outbox import Outbox
from agent.receiver import Receiver
from agent.records import EntityType, Record
from tests.helpers.waiting import wait_for

INITIAL = 0.02
CAP = 0.32
WINDOW = 4.0
RAMP = 1 + math.ceil(math.log2(CAP / INITIAL))  # delays whose ceiling is below the cap
ALLOWED = 1 + RAMP + math.ceil(2 * WINDOW / (CAP / 2))
RECORDS = 64

FAULTS: dict[str, dict[str, Any]] = {
    "413_forever": {"max_body_bytes": 10},
    "400_forever": {"reject_pattern": ".", "reject_mode": "batch"},
    "answer_incomplete_forever": {"omit_pattern": ".", "omit_count": 10**9},
}
EVENTS = {
    "413_forever": "batch_split",
    "400_forever": "batch_bisected",
    "answer_incomplete_forever": "upstream_answer_incomplete",
}


@pytest.fixture
async def forwarder(tmp_path: Path, outbox: Outbox, receiver: Receiver) -> AsyncIterator[Forwarder]:
    settings = make_settings(
        tmp_path,
        receiver.url,
        backoff_initial=INITIAL,
        backoff_cap=CAP,
        batch_max_records=RECORDS,
        gzip_min_bytes="1GiB",
    )
    fwd = Forwarder(outbox, settings.upstream, "agent-test")
    yield fwd
    await fwd.stop()


def _in_window(receiver: Receiver) -> list[float]:
    times = [entry["at"] for entry in receiver.log]
    return [t for t in times if t <= times[0] + WINDOW]


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_an_upstream_refusing_everything_gets_requests_at_the_backoff_pace(
    outbox: Outbox, receiver: Receiver, forwarder: Forwarder, fault: str
) -> None:
    receiver.faults.update(FAULTS[fault])
    ids = (await outbox.append(make_records(RECORDS, entities=RECORDS))).ids
    with capture_logs() as logs:
        await forwarder.start()
        await wait_for(lambda: receiver.log, what="a first request")
        first = receiver.log[0]["at"]
        await wait_for(lambda: time.time() > first + WINDOW + 0.5, WINDOW + 30, "the window")
    seen = _in_window(receiver)
    print(fault, len(seen), "requests in window, allowed", ALLOWED)  # shown with -s
    assert len(seen) <= ALLOWED, (
        f"{len(seen)} requests in {WINDOW}s; the backoff schedule allows at most {ALLOWED}"
    )
    # Not by luck of timing: every answer that settled nothing whole was followed by a
    # backoff delay before the next request.
    waits = [e for e in logs if e["event"] == EVENTS[fault] and "retry_in" in e]
    assert len(waits) >= len(receiver.log) - 1
    assert all(0 <= e["retry_in"] <= CAP for e in waits)
    # The upstream is fixed: everything still queued is delivered, nothing lost.
    receiver.faults.update({"max_body_bytes": None, "reject_pattern": None, "omit_pattern": None})
    await wait_for(lambda: _settled(outbox), 120, "every record delivered or dead-lettered")
    dead = {d["id"]: d["reason"] for d in await outbox.dead_letters()}
    assert receiver.store.ids() | set(dead) == set(ids)
    if fault == "413_forever":
        assert all(reason.startswith("too large even alone: HTTP 413") for reason in dead.values())
    elif fault == "400_forever":
        assert all("HTTP 400" in reason for reason in dead.values())
    else:
        assert dead == {}


async def _settled(outbox: Outbox) -> bool:
    return sum((await outbox.stats()).rows.values()) == 0


async def test_a_record_still_too_large_alone_is_dead_lettered_with_the_reason(
    outbox: Outbox, receiver: Receiver, forwarder: Forwarder
) -> None:
    small = make_records(3, entities=3)
    big = Record.entity(SOURCE, EntityType.WORK_ORDER, "wo-big", {"blob": "x" * 4000})
    stored = await outbox.append([*small[:2], big, small[2]])
    receiver.faults.update({"max_body_bytes": 3000})
    await forwarder.start()
    await wait_for(lambda: _settled(outbox), 60, "all settled")
    (dead,) = await outbox.dead_letters()
    assert dead["id"] == stored.ids[2]
    assert dead["reason"].startswith("too large even alone: HTTP 413 payload_too_large")
    assert "request_id=" in dead["reason"]
    assert receiver.store.ids() == {stored.ids[i] for i in (0, 1, 3)}
