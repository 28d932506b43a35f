"""The NATS JetStream sink against a private ``nats-server -js`` (tests/helpers/natsserver.py).

What the sink contract (tests/contract) cannot ask of JetStream, in its own words: a
record resent is a duplicate by ``Nats-Msg-Id``; a record over the stream's
``max_msg_size`` is refused alone; a missing stream is a transient failure until it
exists; one entity never has two records in flight, so a failure stops that entity's
later records and no other; subjects from the template are token-safe.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

from agent.errors import TransientError
from agent.forwarder import Forwarder
from agent.outbox import Leased, Outbox
from agent.records import EntityType, Record, SourceRef
from agent.sinks.nats import NatsConfig, NatsSink, token_safe
from tests.helpers.natsserver import NatsServer, have_nats_server, stream_messages
from tests.helpers.waiting import wait_for
from tests.outbox_helpers import SRC, T0

pytestmark = pytest.mark.skipif(not have_nats_server(), reason="nats-server not installed")

STREAM = "NATSTEST"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    srv = NatsServer(tmp_path / "nats").start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[Outbox]:
    async with Outbox(tmp_path / "outbox.db") as outbox:
        yield outbox


def config(server: NatsServer, **over: Any) -> NatsConfig:
    table: dict[str, Any] = {
        "type": "nats",
        "servers": [server.url],
        "stream": STREAM,
        "subject": "t.{site}.{entity_type}",
        "create_stream": True,
        "backoff_initial": "50ms",
        "backoff_cap": "200ms",
        "ack_timeout": "10s",
        **over,
    }
    return NatsConfig.model_validate(table)


async def make_stream(server: NatsServer, **kw: Any) -> None:
    nc = await nats.connect(servers=[server.url])
    try:
        await nc.jetstream().add_stream(name=STREAM, **kw)
    finally:
        await nc.close()


def reading(point: str, n: int, src: SourceRef = SRC, pad: int = 0) -> Record:
    data: dict[str, object] = {"value": n, "notes": "x" * pad}
    return Record.reading(src, EntityType.METER_READING, point, T0 + timedelta(seconds=n), data)


def event(point: str, n: int) -> Record:
    return Record.reading(SRC, EntityType.EVENT, point, T0 + timedelta(seconds=n), {"n": n})


async def leased(box: Outbox, records: list[Record]) -> list[Leased]:
    await box.append(records)
    return await box.lease(10_000, 1 << 30)


async def test_published_once_then_duplicate_with_subject_payload_and_msg_id(
    server: NatsServer, box: Outbox
) -> None:
    odd = SourceRef("feed", "mqtt", "plant 1.hall*>")
    batch = await leased(box, [reading("a", 0), reading("b", 1), reading("c", 2, src=odd)])
    sink = NatsSink(config(server), "agent-1")
    try:
        first = await sink.send(batch, batch_id="b1")
        assert sorted(first.accepted) == sorted(i.id for i in batch)
        again = await sink.send(batch, batch_id="b1")
        assert again.accepted == []
        assert sorted(again.duplicates) == sorted(i.id for i in batch)
    finally:
        await sink.close()
    msgs = await stream_messages([server.url], STREAM)
    assert [mid for mid, _ in msgs] == [i.id for i in batch]  # stored once, in order
    assert [body for _, body in msgs] == [i.body for i in batch]  # the envelope JSON
    nc = await nats.connect(servers=[server.url])
    try:
        js = nc.jetstream()
        last = await js.get_last_msg(STREAM, "t.plant_1_hall__.meter_reading")
        assert orjson.loads(last.data)["id"] == batch[2].id
    finally:
        await nc.close()


def test_token_safe() -> None:
    assert token_safe("plant-1_a") == "plant-1_a"
    assert token_safe("a.b c*>") == "a_b_c__"
    assert token_safe("") == "_"


async def test_record_over_the_streams_max_msg_size_is_rejected_alone(
    server: NatsServer, box: Outbox
) -> None:
    await make_stream(server, subjects=["t.>"], max_msg_size=1500)
    batch = await leased(box, [reading("a", 0), reading("a", 1, pad=3000), reading("a", 2)])
    sink = NatsSink(config(server, create_stream=False), "agent-1")
    try:
        result = await sink.send(batch, batch_id="b1")
    finally:
        await sink.close()
    assert [r.id for r in result.rejected] == [batch[1].id]
    assert result.rejected[0].code == "too_large"
    # refused for good, so the entity's next record followed it
    assert result.accepted == [batch[0].id, batch[2].id]


async def test_missing_stream_is_transient_until_it_exists(server: NatsServer, box: Outbox) -> None:
    batch = await leased(box, [reading("a", 0)])
    sink = NatsSink(config(server, create_stream=False), "agent-1")
    try:
        with pytest.raises(TransientError) as failed:
            await sink.send(batch, batch_id="b1")
        assert failed.value.status == 404
        assert "does not exist" in str(failed.value)
        assert sink.health().state.value == "retrying"
        await make_stream(server, subjects=["t.>"])
        result = await sink.send(batch, batch_id="b1")
        assert result.accepted == [batch[0].id]
        assert sink.health().state.value == "ok"
    finally:
        await sink.close()


async def test_a_failing_entity_stops_alone_and_keeps_its_order(
    server: NatsServer, box: Outbox
) -> None:
    """Events have no stream (no responders): the first event of each entity fails and
    its later events are NOT published (one in flight per entity); readings go on."""
    await make_stream(server, subjects=["t.*.meter_reading"])
    records = [event("e1", 0), reading("r", 0), event("e1", 1), reading("r", 1), event("e1", 2)]
    batch = await leased(box, records)
    sink = NatsSink(config(server, create_stream=False), "agent-1")
    try:
        result = await sink.send(batch, batch_id="b1")
    finally:
        await sink.close()
    assert result.accepted == [batch[1].id, batch[3].id]
    assert result.rejected == []
    assert result.duplicates == []
    assert sink.publishes.get("503") == 1, sink.publishes  # e1's later events held back


async def test_forwarder_delivers_across_a_server_restart(server: NatsServer, box: Outbox) -> None:
    fwd = Forwarder(box, config(server, batch_max_records=50), "agent-1")
    await fwd.start()
    try:
        first = await box.append([reading(f"p{i}", i) for i in range(20)])
        await wait_for(lambda: fwd.counters.accepted == 20, 30, "first records delivered")
        server.kill()
        later = await box.append([reading(f"p{i}", 100 + i) for i in range(20)])
        await wait_for(
            lambda: fwd.health().health.state.value == "retrying", 30, "retrying while down"
        )
        server.start()

        async def empty() -> bool:
            return sum((await box.stats()).rows.values()) == 0

        await wait_for(empty, 60, "everything delivered after the restart")
    finally:
        await fwd.stop()
    ids = [mid for mid, _ in await stream_messages([server.url], STREAM)]
    want = [i for i in (*first.ids, *later.ids) if i]
    assert sorted(ids) == sorted(want)  # every record once
