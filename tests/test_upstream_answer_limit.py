"""The upstream's answer is read within ``max_response_bytes``, whatever it sends.

A raw HTTP server (tests/helpers/rawhttp.py) plays an upstream that answers 200 with a
300 MiB body, gzip and deflate bombs (600 MiB inflated), a 300 MiB chunked error page.
The real forwarder and a real outbox run against it: the agent's memory stays bounded
(peak RSS sampled by the kernel, tests/helpers/rss.py), every attempt is a counted
protocol error logged with its request id and retried with backoff, and nothing is
acknowledged: the outbox still holds every record.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import httpx
import orjson
import pytest
from structlog.testing import capture_logs
from upstream_support import make_records, make_settings

from agent.errors import ConfigError
from agent.forwarder import Forwarder
from agent.outbox import Outbox
from agent.sinks.http import AnswerTooLarge, read_answer
from tests.helpers.rawhttp import MIB, Answer, RawUpstream, bomb, repeated, sliced
from tests.helpers.rss import RssPeak
from tests.helpers.waiting import wait_for

LIMIT = 4 * MIB  # the default max_response_bytes
# What one attempt may hold: the body up to the limit, its copy as bytes, one 64 KiB
# chunk, zlib's 32 KiB window. 24 MiB leaves room for the allocator and the event loop's
# buffers, and is far below the 300 and 600 MiB the upstream sends.
BOUND = 24 * MIB
ATTEMPTS = 3
HUGE = 300 * MIB
BOMB = 600  # MiB inflated


def _answer(kind: str) -> Answer:
    json_start = b'{"accepted": ["'
    if kind == "200_close_delimited":  # no length: the body ends when the connection does
        return Answer(200, {"Content-Type": "application/json"}, repeated(HUGE, json_start))
    if kind == "200_declared_length":
        headers = {"Content-Type": "application/json", "Content-Length": str(HUGE)}
        return Answer(200, headers, repeated(HUGE, json_start))
    if kind == "500_chunked_error_page":
        return Answer(500, {"Content-Type": "text/html"}, repeated(HUGE, b"<html>"), chunked=True)
    coding = kind.removeprefix("200_").removesuffix("_bomb")
    data = bomb(BOMB, coding)
    headers = {
        "Content-Type": "application/json",
        "Content-Encoding": coding,
        "Content-Length": str(len(data)),
    }
    return Answer(200, headers, sliced(data))


@pytest.mark.parametrize(
    "kind",
    [
        "200_close_delimited",
        "200_declared_length",
        "200_gzip_bomb",
        "200_deflate_bomb",
        "500_chunked_error_page",
    ],
)
async def test_an_oversized_answer_is_a_retried_protocol_error_in_bounded_memory(
    tmp_path: Path, kind: str
) -> None:
    records = make_records(50)
    async with RawUpstream(_answer(kind)) as upstream, Outbox(tmp_path / "outbox.db") as box:
        await box.append(records)
        settings = make_settings(tmp_path, upstream.url)
        assert settings.upstream.max_response_bytes == LIMIT
        forwarder = Forwarder(box, settings.upstream, "agent-test")
        with capture_logs() as logs, RssPeak() as rss:
            await forwarder.start()
            try:
                await wait_for(
                    lambda: forwarder.counters.retries >= ATTEMPTS,  # counted as it logs
                    what=f"{ATTEMPTS} attempts refused and retried",
                    detail=forwarder.status,
                )
            finally:
                await forwarder.stop()
        print(kind, rss.describe())  # shown with -s: the figures in docs/upstream.md
        assert rss.growth <= BOUND, rss.describe()
        status = forwarder.status()
        # nothing acknowledged, nothing dead-lettered: every record still queued
        assert status["records"]["accepted"] == 0
        assert status["records"]["rejected"] == 0
        assert sum((await box.stats()).rows.values()) == len(records)
        assert await box.dead_letters() == []
    # each refused answer was retried through the backoff and logged with its request id
    assert status["requests"]["answer_too_large"] >= ATTEMPTS
    retries = [e for e in logs if e["event"] == "upstream_retry"]
    assert len(retries) >= ATTEMPTS
    for event in retries[:ATTEMPTS]:
        assert event["error"].startswith("answer too large"), event
        assert event["request_id"] in upstream.request_ids
        assert event["retry_in"] >= 0


async def _read(answer: Answer, limit: int) -> bytes:
    async with (
        RawUpstream(answer) as upstream,
        httpx.AsyncClient() as client,
        client.stream("POST", upstream.url, content=b"{}") as response,
    ):
        return await read_answer(response, limit)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate", "identity"])
async def test_answers_within_the_limit_are_read_whole(coding: str) -> None:
    """The limit is inclusive and each encoding inflates to the exact body."""
    body = orjson.dumps({"accepted": [f"id-{i:07d}" for i in range(20_000)]})
    limit = len(body)
    if coding == "gzip":
        data = gzip.compress(body)
    elif coding == "identity":
        data = body
    else:
        wbits = zlib.MAX_WBITS if coding == "deflate" else -zlib.MAX_WBITS
        packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
        data = packer.compress(body) + packer.flush()
    headers = {"Content-Encoding": coding.removeprefix("raw-"), "Content-Length": str(len(data))}
    assert await _read(Answer(200, headers, sliced(data)), limit) == body
    with pytest.raises(AnswerTooLarge, match="inflated|as sent|Content-Length"):
        await _read(Answer(200, headers, sliced(data)), limit - 1)


async def test_two_gzip_members_are_one_body() -> None:
    data = gzip.compress(b'{"accepted": ["a",') + gzip.compress(b' "b"]}')
    headers = {"Content-Encoding": "gzip", "Content-Length": str(len(data))}
    assert orjson.loads(await _read(Answer(200, headers, sliced(data)), 1 << 16)) == {
        "accepted": ["a", "b"]
    }


async def test_an_encoding_the_agent_did_not_ask_for_is_a_protocol_error(tmp_path: Path) -> None:
    data = b"\x0b\x02\x80{}\x03"  # brotli for "{}": the agent asks for gzip and deflate only
    answer = Answer(200, {"Content-Encoding": "br", "Content-Length": str(len(data))}, sliced(data))
    async with RawUpstream(answer) as upstream, Outbox(tmp_path / "outbox.db") as box:
        await box.append(make_records(3))
        forwarder = Forwarder(box, make_settings(tmp_path, upstream.url).upstream, "agent-test")
        await forwarder.start()
        try:
            await wait_for(
                lambda: forwarder.status()["requests"].get("answer_undecodable", 0) >= 2,
                what="two undecodable answers",
            )
        finally:
            await forwarder.stop()
        assert "unsupported Content-Encoding 'br'" in (forwarder.last_error or "")
        assert sum((await box.stats()).rows.values()) == 3


def test_max_response_bytes_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_response_bytes"):
        make_settings(tmp_path, "https://x.example", max_response_bytes="1KiB")
