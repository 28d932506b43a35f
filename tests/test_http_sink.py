"""The sink alone: classification, Retry-After, body encoding, headers on the wire."""

from __future__ import annotations

import gzip
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import orjson
import pytest
from upstream_support import (  # fixtures are used by name
    TOKEN,
    make_records,
    make_settings,
    outbox_fixture,  # noqa: F401
    receiver_fixture,  # noqa: F401
)

from agent import __version__
from agent.errors import BatchRejected, BatchTooLarge, ReauthorizationRequired, TransientError
from agent.outbox import Outbox
from agent.receiver import Receiver
from agent.sinks.http import (
    Action,
    HttpSink,
    classify,
    encode_batch,
    parse_retry_after,
)


@pytest.mark.parametrize(
    ("status", "action", "reason"),
    [
        (200, Action.DELIVERED, None),
        (401, Action.REAUTHORIZE, "unauthorized"),
        (403, Action.REAUTHORIZE, "forbidden"),
        (408, Action.RETRY, None),
        (429, Action.RETRY, None),
        (500, Action.RETRY, None),
        (502, Action.RETRY, None),
        (503, Action.RETRY, None),
        (504, Action.RETRY, None),
        (413, Action.SPLIT, None),
        (400, Action.BISECT, None),
        (404, Action.RETRY, None),
        (405, Action.RETRY, None),
        (409, Action.BISECT, None),
        (422, Action.BISECT, None),
        (301, Action.RETRY, None),
    ],
)
def test_classify_status(status: int, action: Action, reason: str | None) -> None:
    verdict = classify(status)
    assert verdict.action is action
    assert verdict.reason == reason


def test_classify_transport_errors_retry_and_bugs_propagate() -> None:
    assert classify(None, httpx.ConnectError("refused")).action is Action.RETRY
    assert classify(None, httpx.ReadTimeout("slow")).action is Action.RETRY
    with pytest.raises(KeyError):
        classify(None, KeyError("a bug is not a network failure"))


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = time.time()
    later = datetime.fromtimestamp(now, UTC) + timedelta(seconds=120)
    assert parse_retry_after(format_datetime(later, usegmt=True), now=now) == pytest.approx(
        120, abs=1
    )
    past = datetime.fromtimestamp(now, UTC) - timedelta(seconds=120)
    assert parse_retry_after(format_datetime(past, usegmt=True), now=now) == 0.0
    assert parse_retry_after("999999") == 3600.0


def test_encode_batch_is_the_envelopes_verbatim() -> None:
    bodies = [b'{"a":1,"seq":1}', b'{"b":"\\u00e9","seq":2}']
    raw = encode_batch('agent "x"', "b-1", bodies)
    assert orjson.loads(raw) == {
        "agent_id": 'agent "x"',
        "batch_id": "b-1",
        "records": [{"a": 1, "seq": 1}, {"b": "é", "seq": 2}],
    }
    assert bodies[1] in raw


async def test_send_sends_the_v1_headers_and_gzip(
    tmp_path: Path, receiver: Receiver, outbox: Outbox
) -> None:
    await outbox.append(make_records(200))
    batch = await outbox.lease(1000, 1 << 30)
    settings = make_settings(tmp_path, receiver.url, gzip_min_bytes=1024)
    sink = HttpSink(settings.upstream, "agent-test")
    try:
        result = await sink.send(batch, batch_id="batch-42")
    finally:
        await sink.close()
    assert sorted(result.accepted) == sorted(item.id for item in batch)
    headers = receiver.log[-1]["headers"]
    assert headers["authorization"] == f"Bearer {TOKEN}"
    assert headers["x-api-version"] == "1"
    assert headers["idempotency-key"] == "batch-42"
    assert headers["user-agent"] == f"edge-agent/{__version__}"
    assert headers["content-encoding"] == "gzip"
    assert len(headers["x-request-id"]) == 36
    assert result.wire_bytes < sum(item.size for item in batch)
    stored = receiver.store.page(None, None, 0, 1000)[0]
    assert {orjson.loads(b)["seq"] for b in stored} == {item.seq for item in batch}


async def test_small_body_is_not_compressed(
    tmp_path: Path, receiver: Receiver, outbox: Outbox
) -> None:
    await outbox.append(make_records(1))
    sink = HttpSink(make_settings(tmp_path, receiver.url).upstream, "agent-test")
    try:
        payload = await sink.prepare(await outbox.lease(10, 1 << 20))
    finally:
        await sink.close()
    assert not payload.gzipped
    assert orjson.loads(payload.content)["agent_id"] == "agent-test"
    with pytest.raises(gzip.BadGzipFile):
        gzip.decompress(payload.content)


async def test_errors_carry_status_retry_after_and_request_id(
    tmp_path: Path, receiver: Receiver, outbox: Outbox
) -> None:
    await outbox.append(make_records(3))
    batch = await outbox.lease(10, 1 << 20)
    sink = HttpSink(make_settings(tmp_path, receiver.url).upstream, "agent-test")
    try:
        receiver.faults.update({"status": 429, "status_count": 1, "retry_after": "3"})
        with pytest.raises(TransientError) as transient:
            await sink.send(batch, batch_id="b")
        assert transient.value.status == 429
        assert transient.value.retry_after == 3.0
        assert transient.value.request_id == receiver.log[-1]["headers"]["x-request-id"]
        receiver.faults.update({"status": 403, "status_count": 1})
        with pytest.raises(ReauthorizationRequired) as reauth:
            await sink.send(batch, batch_id="b")
        assert reauth.value.reason == "forbidden"
        receiver.faults.update({"status": 413, "status_count": 1})
        with pytest.raises(BatchTooLarge):
            await sink.send(batch, batch_id="b")
        receiver.faults.update({"reject_pattern": batch[0].id, "reject_mode": "batch"})
        with pytest.raises(BatchRejected) as rejected:
            await sink.send(batch, batch_id="b")
        assert rejected.value.code == "poison_record"
        assert sink.requests == {"429": 1, "403": 1, "413": 1, "400": 1}
    finally:
        await sink.close()
