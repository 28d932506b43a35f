"""The sink contract, run against EVERY registered sink type (agent.sinks.base.SINKS).

Each type is driven by its harness (tests/contract/sink_harness.py): a real upstream that
misbehaves on demand. What every sink must do (agent/sinks/base.py):

* say per record: accepted, duplicate (sent before), or rejected with a code and message;
* a transient failure raises ``TransientError`` carrying the status, the delay the
  upstream asked for (``retry_after``) and a request id; the forwarder retries and
  delivers;
* a batch the upstream finds too large raises ``BatchTooLarge``; the forwarder splits
  and delivers every record;
* refused credentials raise ``ReauthorizationRequired``; a reconfigured sink with new
  credentials delivers on its next send;
* ``close()`` while a send is in flight returns promptly and ends that send with a
  ``TransientError`` (no record reported delivered); a cancelled send ends promptly;
* the upstream's health (forwarder and sink together) goes ok -> retrying -> ok as the
  peer goes away and comes back, and nothing queued meanwhile is lost.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.errors import BatchTooLarge, ReauthorizationRequired, TransientError
from agent.forwarder import Forwarder
from agent.health import State
from agent.outbox import Leased, Outbox
from agent.records import EntityType, Record
from agent.sinks.base import Sink, UpstreamConfig
from tests.contract.registry import sink_plugin, sink_types
from tests.contract.sink_harness import SINK_HARNESSES, SinkHarness
from tests.helpers.waiting import wait_for
from tests.outbox_helpers import SRC, T0

DEADLINE = 10.0
"""How long close() and an interrupted send may take (generous: a loaded machine)."""

PARAMS = [
    pytest.param(cls, id=cls.type if len(SINK_HARNESSES[kind]) == 1 else cls.__name__)
    for kind in sink_types()
    for cls in SINK_HARNESSES.get(kind, [])
]


@pytest.fixture(params=PARAMS)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SinkHarness]:
    """A started upstream peer of one registered sink type."""
    h: SinkHarness = request.param(tmp_path)
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[Outbox]:
    async with Outbox(tmp_path / "outbox.db") as outbox:
        yield outbox


def config(h: SinkHarness, **over: Any) -> UpstreamConfig:
    """The harness's table as the config loader validates it (the plugin's class)."""
    table = h.table(**over)
    return sink_plugin(table["type"]).config_class.model_validate(table)


@pytest.fixture
async def sink(harness: SinkHarness) -> AsyncIterator[Sink]:
    s = sink_plugin(harness.type).build(config(harness), "contract-agent")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def reading(point: str, n: int, pad: int = 0) -> Record:
    """The n-th reading of ``point``, with ``pad`` bytes of incompressible notes (a
    sink may compress: a size limit must still be reached)."""
    data: dict[str, object] = {"value": n, "notes": secrets.token_hex(pad // 2)}
    return Record.reading(SRC, EntityType.METER_READING, point, T0 + timedelta(seconds=n), data)


async def leased(box: Outbox, n: int, point: str = "p", pad: int = 0) -> list[Leased]:
    """``n`` new records appended and leased, as the forwarder hands them to a sink."""
    records = [reading(point, i, pad) for i in range(n)]
    await box.append(records)
    batch = await box.lease(10_000, 1 << 30)
    assert len(batch) == n
    return batch


def ids(batch: list[Leased]) -> list[str]:
    return [item.id for item in batch]


# ---------------------------------------------------------------------- the sink alone


async def test_accepted_duplicate_and_rejected_per_record(
    harness: SinkHarness, sink: Sink, box: Outbox
) -> None:
    batch = await leased(box, 6)
    poison = {batch[1].id, batch[4].id}
    await harness.reject("|".join(sorted(poison)))
    first = await sink.send(batch, batch_id="b1")
    good = [i for i in ids(batch) if i not in poison]
    assert sorted(first.accepted) == sorted(good)
    assert first.duplicates == []
    assert {r.id for r in first.rejected} == poison
    assert all(r.code and r.message for r in first.rejected)
    again = await sink.send(batch, batch_id="b2")
    if harness.knows_duplicates:
        assert again.accepted == []
        assert sorted(again.duplicates) == sorted(good)
    else:  # at-least-once: accepted again
        assert sorted(again.accepted) == sorted(good)
    assert {r.id for r in again.rejected} == poison
    assert harness.stored_ids() == set(good)


async def test_transient_failure_carries_retry_after(
    harness: SinkHarness, sink: Sink, box: Outbox
) -> None:
    batch = await leased(box, 3)
    await harness.fail_next(retry_after=7)
    with pytest.raises(TransientError) as failed:
        await sink.send(batch, batch_id="b1")
    if harness.transient_detail:
        assert failed.value.retry_after == 7.0
        assert failed.value.status is not None
    assert failed.value.request_id
    assert harness.stored_ids() == set()
    result = await sink.send(batch, batch_id="b1")  # the retry
    assert sorted(result.accepted) == sorted(ids(batch))


async def test_oversized_batch_raises_batch_too_large(
    harness: SinkHarness, sink: Sink, box: Outbox
) -> None:
    if not harness.limits_batches:
        pytest.skip(f"{harness.type} sizes its messages itself (see SinkHarness.limits_batches)")
    batch = await leased(box, 8, pad=2000)
    await harness.limit_batch(6000)
    with pytest.raises(BatchTooLarge):
        await sink.send(batch, batch_id="b1")
    small = await sink.send(batch[:1], batch_id="b2")
    assert small.accepted == [batch[0].id]


async def test_refused_credentials_then_reconfigured(
    harness: SinkHarness, sink: Sink, box: Outbox
) -> None:
    batch = await leased(box, 2)
    await harness.rotate_credentials()
    with pytest.raises(ReauthorizationRequired) as refused:
        await sink.send(batch, batch_id="b1")
    assert refused.value.reason
    sink.reconfigure(config(harness), "contract-agent")  # a reload with the new token
    result = await sink.send(batch, batch_id="b1")
    assert sorted(result.accepted) == sorted(ids(batch))


async def test_close_while_sending(harness: SinkHarness, sink: Sink, box: Outbox) -> None:
    """close() during a send returns promptly and ends the send with a TransientError:
    no record is reported delivered, so the forwarder sends them again later."""
    batch = await leased(box, 2)
    await harness.slow(30)
    sending = asyncio.create_task(sink.send(batch, batch_id="b1"))
    await wait_for(lambda: harness.stored_ids() or sending.done(), 30, "request under way")
    await asyncio.wait_for(sink.close(), DEADLINE)
    done, _ = await asyncio.wait({sending}, timeout=DEADLINE)
    if not done:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
    assert done, "the send went on after close()"
    assert isinstance(sending.exception(), TransientError), sending.exception()


async def test_cancel_while_sending(harness: SinkHarness, sink: Sink, box: Outbox) -> None:
    """A send in flight ends promptly when cancelled (the forwarder's stop)."""
    batch = await leased(box, 2)
    await harness.slow(30)
    sending = asyncio.create_task(sink.send(batch, batch_id="b1"))
    await wait_for(lambda: harness.stored_ids() or sending.done(), 30, "request under way")
    sending.cancel()
    done, _ = await asyncio.wait({sending}, timeout=DEADLINE)
    assert done, "the send went on after its cancel"
    assert sending.cancelled()


# ---------------------------------------------------------------------- through the forwarder


@pytest.fixture
async def forwarder(harness: SinkHarness, box: Outbox) -> AsyncIterator[Forwarder]:
    fwd = Forwarder(box, config(harness, batch_max_records=4), "contract-agent", "s1")
    await fwd.start()
    try:
        yield fwd
    finally:
        await fwd.stop()


async def delivered(box: Outbox, h: SinkHarness, want: set[str]) -> None:
    async def done() -> bool:
        return want <= h.stored_ids() and sum((await box.stats()).rows.values()) == 0

    await wait_for(done, 30, "every record delivered and acked")


async def test_forwarder_retries_a_transient_failure(
    harness: SinkHarness, forwarder: Forwarder, box: Outbox
) -> None:
    await harness.fail_next(retry_after=1)
    records = [reading("p", i) for i in range(6)]
    result = await box.append(records)
    await delivered(box, harness, {i for i in result.ids if i})
    assert forwarder.counters.retries >= 1


async def test_forwarder_splits_an_oversized_batch(
    harness: SinkHarness, forwarder: Forwarder, box: Outbox
) -> None:
    if not harness.limits_batches:
        pytest.skip(f"{harness.type} sizes its messages itself (see SinkHarness.limits_batches)")
    await harness.limit_batch(5000)
    records = [reading("p", i, pad=1500) for i in range(4)]
    result = await box.append(records)
    await delivered(box, harness, {i for i in result.ids if i})
    assert forwarder.counters.splits >= 1


async def test_health_ok_retrying_ok_and_nothing_lost(
    harness: SinkHarness, forwarder: Forwarder, box: Outbox
) -> None:
    def state() -> State:
        return forwarder.health().health.state

    first = await box.append([reading("p", 0)])
    await delivered(box, harness, {i for i in first.ids if i})
    assert state() is State.OK
    await harness.break_peer()
    later = await box.append([reading("p", i) for i in range(1, 5)])
    await wait_for(lambda: state() is State.RETRYING, 30, "retrying", detail=state)
    await harness.restore_peer()
    await delivered(box, harness, {i for i in later.ids if i})
    await wait_for(lambda: state() is State.OK, 30, "ok again", detail=state)
