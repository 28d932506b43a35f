"""The forwarder against the real receiver on 127.0.0.1: every answer of the contract.

Each test checks the end state: nothing lost (every id at the receiver or dead-lettered
with a reason), duplicates recognised, per-entity order kept (seq by arrival).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trustme
from upstream_support import (  # fixtures are used by name
    SOURCE,
    TOKEN,
    make_records,
    make_settings,
    outbox_fixture,  # noqa: F401
    receiver_fixture,  # noqa: F401
)

from agent.forwarder import REAUTH, RETRYING, Forwarder
from agent.outbox import Outbox
from agent.receiver import Receiver, running_receiver
from agent.records import EntityType, Record
from tests.helpers.waiting import free_port, wait_for, wait_port
from tests.outbox_helpers import chained_ids, reading


class Harness:
    """An outbox, a forwarder and a receiver, with the checks every test makes."""

    def __init__(self, tmp_path: Path, outbox: Outbox, receiver: Receiver, **upstream: Any):
        self.tmp_path = tmp_path
        self.outbox = outbox
        self.receiver = receiver
        self.settings = make_settings(tmp_path, receiver.url, **upstream)
        self.forwarder = Forwarder(outbox, self.settings.upstream, "agent-test")

    async def append(self, records: list[Record]) -> None:
        await self.outbox.append(records)

    async def undelivered(self) -> int:
        return sum((await self.outbox.stats()).rows.values())

    async def delivered(self) -> bool:
        return await self.undelivered() == 0

    async def wait_delivered(self, timeout: float = 30.0) -> None:
        await wait_for(self.delivered, timeout, "outbox drained")

    def ids(self, records: list[Record]) -> list[str]:
        """The ids ``records``, all appended in this order, are stored and sent under."""
        return [i for i in chained_ids(self.outbox.epoch, records) if i is not None]

    def check_store(self, records: list[Record], rejected: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        assert self.receiver.store.ids() == set(self.ids(records)) - rejected
        assert self.receiver.store.order_violations() == []


Start = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def start(tmp_path: Path, outbox: Outbox, receiver: Receiver) -> AsyncIterator[Start]:
    """``harness = await start(**upstream_settings)``: a running forwarder."""
    started: list[Harness] = []

    async def go(**upstream: Any) -> Harness:
        h = Harness(tmp_path, outbox, receiver, **upstream)
        await h.forwarder.start()
        started.append(h)
        return h

    yield go
    for h in started:
        await h.forwarder.stop()


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_retried_until_delivered(start: Start, status: int) -> None:
    harness = await start()
    harness.receiver.faults.update({"status": status, "status_count": 3})
    records = make_records(50)
    await harness.append(records)
    await harness.wait_delivered()
    harness.check_store(records)
    status_view = harness.forwarder.status()
    assert status_view["requests"][str(status)] == 3
    assert status_view["state"] == "ok"
    assert status_view["records"]["accepted"] == 50
    assert status_view["last_error"].startswith(f"HTTP {status}")


async def test_429_retry_after_is_honoured(start: Start) -> None:
    harness = await start()
    harness.receiver.faults.update({"status": 429, "status_count": 1, "retry_after": "1"})
    records = make_records(5)
    await harness.append(records)
    await harness.wait_delivered()
    harness.check_store(records)
    first, second = list(harness.receiver.log)[:2]
    assert first["status"] == 429
    # Backoff alone is at most 0.1 s here; the gap is the upstream's Retry-After (a lower
    # bound the forwarder guarantees, not a timing measurement).
    assert second["at"] - first["at"] >= 0.9


async def test_403_enters_reauthorization_and_emits_connection_status(start: Start) -> None:
    harness = await start()
    harness.receiver.faults.update({"status": 403, "status_count": 1})
    records = make_records(5)
    await harness.append(records)
    await wait_for(lambda: harness.forwarder.state == REAUTH, what="reauthorization state")
    assert harness.forwarder.status()["reason"] == "forbidden"
    await wait_for(
        lambda: _undelivered_is(harness, 6), what="connection_status queued"
    )  # appended in the background
    # A reload (same token; the upstream allows it again) wakes the 10-minute probe sleep.
    harness.forwarder.reconfigure(harness.settings)
    await harness.wait_delivered()
    types = _stored_types(harness.receiver)
    assert types.count("connection_status") == 2  # reauthorization_required, then connected
    states = [
        r["data"]["state"]
        for r in _stored(harness.receiver)
        if r["entity_type"] == "connection_status"
    ]
    assert states == ["reauthorization_required", "connected"]
    assert harness.forwarder.state == "ok"


async def _undelivered_is(harness: Harness, n: int) -> bool:
    return await harness.undelivered() == n


def _stored(receiver: Receiver) -> list[dict[str, Any]]:
    return [orjson.loads(b) for b in receiver.store.page(None, None, 0, 1000)[0]]


def _stored_types(receiver: Receiver) -> list[str]:
    return [r["entity_type"] for r in _stored(receiver)]


async def test_401_then_new_token_by_reconfigure(start: Start, tmp_path: Path) -> None:
    harness = await start()
    await harness.receiver.stop()
    harness.receiver.token = "rotated-token"
    await harness.receiver.start()
    records = make_records(20)
    await harness.append(records)
    await wait_for(lambda: harness.forwarder.state == REAUTH, what="reauthorization state")
    assert harness.forwarder.reason == "unauthorized"
    assert await harness.undelivered() >= 20  # kept buffering
    new = make_settings(tmp_path, harness.receiver.url, token="rotated-token")
    harness.forwarder.reconfigure(new)
    await harness.wait_delivered()
    assert set(harness.ids(records)) <= harness.receiver.store.ids()
    assert harness.receiver.store.order_violations() == []


async def test_413_splits_until_batches_fit(start: Start) -> None:
    harness = await start(batch_max_records=64, gzip_min_bytes="1GiB")
    records = make_records(64)
    await harness.append(records)
    one = len(records[0].to_json()) + 20
    # The wire limit fits about 10 records (bodies are not compressed here).
    harness.receiver.faults.update({"max_body_bytes": one * 10})
    await harness.wait_delivered()
    harness.check_store(records)
    assert harness.forwarder.counters.splits >= 3
    assert harness.forwarder.counters.rejected == 0


async def test_413_on_a_single_record_dead_letters_it(start: Start) -> None:
    harness = await start(batch_max_records=64)
    harness.receiver.faults.update({"max_body_bytes": 10})
    records = make_records(2)
    await harness.append(records)
    await harness.wait_delivered()
    dead = await harness.outbox.dead_letters()
    assert len(dead) == 2
    assert all("HTTP 413" in d["reason"] for d in dead)


@pytest.mark.parametrize("mode", ["batch", "record"])
async def test_poison_record_is_isolated_and_the_rest_delivered(start: Start, mode: str) -> None:
    harness = await start()
    records = make_records(100, entities=7)
    poison = harness.ids(records)[37]
    harness.receiver.faults.update({"reject_pattern": poison, "reject_mode": mode})
    await harness.append(records)
    await harness.wait_delivered()
    harness.check_store(records, rejected={poison})
    dead = await harness.outbox.dead_letters()
    assert [d["id"] for d in dead] == [poison]
    if mode == "batch":
        assert "HTTP 400 poison_record" in dead[0]["reason"]
        assert f"record {poison} is refused" in dead[0]["reason"]
        assert harness.forwarder.counters.bisections >= 7
    else:
        assert dead[0]["reason"].startswith("rejected poison:")


async def test_connection_refused_then_receiver_comes_up(start: Start) -> None:
    harness = await start()
    await harness.receiver.stop()
    records = make_records(30)
    await harness.append(records)
    await wait_for(
        lambda: harness.forwarder.status()["requests"].get("connect_error", 0) >= 2,
        what="connection refused twice",
    )
    assert harness.forwarder.state == RETRYING
    await harness.receiver.start()
    await harness.wait_delivered()
    harness.check_store(records)


async def test_read_timeout_retries_and_duplicates_are_recognised(start: Start) -> None:
    harness = await start(read_timeout=0.3)
    harness.receiver.faults.update({"latency": 1.0, "latency_count": 1})
    records = make_records(10)
    await harness.append(records)
    await harness.wait_delivered()
    harness.check_store(records)
    status = harness.forwarder.status()
    assert status["requests"]["timeout"] == 1
    # The slow answer's batch was stored; the retry is answered "duplicates", and acked.
    assert status["records"]["duplicates"] == 10
    await wait_for(lambda: harness.receiver.store.stats()["duplicates"] == 10, what="dups")


@pytest.mark.slow
async def test_order_per_entity_holds_at_concurrency_with_failures(start: Start) -> None:
    harness = await start(concurrency=4, batch_max_records=16)
    harness.receiver.faults.update({"fail_rate": 0.3})
    records = make_records(2000, entities=13)
    for start in range(0, 2000, 100):
        await harness.append(records[start : start + 100])
    await harness.wait_delivered(60)
    harness.check_store(records)


async def test_same_id_twice_in_a_batch_is_acked_twice(start: Start) -> None:
    harness = await start()
    # Readings: an entity version equal to the one before it is not even appended.
    records = [reading("meter", n) for n in range(3)]
    await harness.append([records[0], records[1], records[0], records[2]])
    await harness.wait_delivered()
    harness.check_store(records)
    assert harness.forwarder.counters.accepted + harness.forwarder.counters.duplicates == 4


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server = tmp_path / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    return server, ca_file


async def _tls_run(
    tmp_path: Path,
    outbox: Outbox,
    tls: tuple[Path, Path],
    client_ca: Path | None = None,
    **upstream: Any,
) -> dict[str, Any]:
    server, _ = tls
    async with running_receiver(
        tmp_path / "tls.db",
        TOKEN,
        ssl_certfile=str(server),
        ssl_client_ca=str(client_ca) if client_ca else None,
    ) as rx:
        assert rx.url.startswith("https://")
        settings = make_settings(tmp_path, rx.url, **upstream)
        fwd = Forwarder(outbox, settings.upstream, "agent-test")
        await fwd.start()
        try:
            await outbox.append(make_records(10))
            await wait_for(
                lambda: fwd.counters.accepted == 10 or fwd.state == RETRYING, what="an outcome"
            )
            return fwd.status() | {"stored": rx.store.count()}
        finally:
            await fwd.stop()


async def test_tls_with_private_ca(tmp_path: Path, outbox: Outbox, tls: tuple[Path, Path]) -> None:
    status = await _tls_run(tmp_path, outbox, tls, ca_file=str(tls[1]))
    assert status["records"]["accepted"] == 10
    assert status["stored"] == 10


async def test_tls_refused_without_the_ca(
    tmp_path: Path, outbox: Outbox, tls: tuple[Path, Path]
) -> None:
    status = await _tls_run(tmp_path, outbox, tls)
    assert status["state"] == RETRYING
    assert "CERTIFICATE_VERIFY_FAILED" in status["last_error"]
    assert status["stored"] == 0
    assert sum((await outbox.stats()).rows.values()) == 10


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP proxy (Debian's tinyproxy) on 127.0.0.1: its URL and its log."""
    binary = shutil.which("tinyproxy")
    if binary is None:
        pytest.skip("tinyproxy not installed (apt-get install tinyproxy-bin); CI installs it")
    port, log = free_port(), tmp_path / "tinyproxy.log"
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(
        f'Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nLogFile "{log}"\n'
        "LogLevel Connect\nMaxClients 20\n"
    )
    proc = subprocess.Popen(
        [binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        proc.wait(10)


async def test_https_upstream_through_a_proxy(
    tmp_path: Path, outbox: Outbox, tls: tuple[Path, Path], tinyproxy: tuple[str, Path]
) -> None:
    """upstream.proxy: every request goes through the proxy (CONNECT tunnel), TLS is
    still verified end to end against the upstream's certificate."""
    proxy, log = tinyproxy
    status = await _tls_run(tmp_path, outbox, tls, ca_file=str(tls[1]), proxy=proxy)
    assert status["records"]["accepted"] == 10
    assert status["stored"] == 10
    assert "CONNECT 127.0.0.1:" in log.read_text()


async def test_a_dead_proxy_keeps_records_and_says_so(
    tmp_path: Path, outbox: Outbox, tls: tuple[Path, Path]
) -> None:
    port = free_port()
    proxy = f"http://plant:pr0xy-secret@127.0.0.1:{port}"
    status = await _tls_run(tmp_path, outbox, tls, ca_file=str(tls[1]), proxy=proxy)
    assert status["state"] == RETRYING
    # the operator is told it is the proxy, and never its password
    assert f"(via proxy http://127.0.0.1:{port})" in status["last_error"]
    assert "pr0xy-secret" not in str(status)
    assert status["stored"] == 0
    assert sum((await outbox.stats()).rows.values()) == 10


@pytest.mark.parametrize("with_cert", [True, False])
async def test_mutual_tls_client_certificate(
    tmp_path: Path, outbox: Outbox, tls: tuple[Path, Path], with_cert: bool
) -> None:
    client_ca = trustme.CA()
    client = client_ca.issue_cert("gw-plant-1000.example")
    client_ca.cert_pem.write_to_path(tmp_path / "client-ca.pem")
    client.cert_chain_pems[0].write_to_path(tmp_path / "client.pem")
    client.private_key_pem.write_to_path(tmp_path / "client.key")
    cert = (
        {
            "client_cert_file": str(tmp_path / "client.pem"),
            "client_key_file": str(tmp_path / "client.key"),
        }
        if with_cert
        else {}
    )
    status = await _tls_run(
        tmp_path, outbox, tls, client_ca=tmp_path / "client-ca.pem", ca_file=str(tls[1]), **cert
    )
    if with_cert:
        assert status["stored"] == 10
    else:
        assert status["state"] == RETRYING
        assert status["stored"] == 0


async def test_records_missing_from_an_answer_are_sent_again(start: Start) -> None:
    harness = await start()
    records = make_records(10)
    ids = harness.ids(records)
    harness.receiver.faults.update({"omit_pattern": f"^({ids[3]}|{ids[7]})$"})
    await harness.append(records)
    await harness.wait_delivered()
    harness.check_store(records)
    status = harness.forwarder.status()
    assert status["records"]["accepted"] == 8
    assert status["records"]["duplicates"] == 2  # the second answer names them
    assert status["records"]["sent"] == 12


async def test_drain_does_not_wait_while_credentials_are_refused(start: Start) -> None:
    harness = await start()
    harness.receiver.faults.update({"status": 401, "status_count": 1})
    await harness.append(make_records(3))
    await wait_for(lambda: harness.forwarder.state == REAUTH, what="401 seen")
    assert await harness.forwarder.drain(timeout=600) is False
    # Nothing was lost: the records, and the connection_status record (appended in the
    # background), wait in the outbox.
    await wait_for(lambda: _undelivered_is(harness, 4), what="4 queued")


def wo_version(remote_id: str, status: str) -> Record:
    """A version of one work order whose content is ``status``."""
    return Record.entity(SOURCE, EntityType.WORK_ORDER, remote_id, {"status": status})


@pytest.mark.parametrize("statuses", ["ABA", "ABAB"])
async def test_a_return_to_an_earlier_content_reaches_the_upstream(
    start: Start, statuses: str
) -> None:
    """Regression (issue 17): the third version of A, B, A had the first one's id, so the
    upstream answered "duplicate" and kept B forever. Chained ids make each a version."""
    harness = await start()
    results = [await harness.outbox.append([wo_version("wo-1", s)]) for s in statuses]
    await harness.wait_delivered()
    latest = harness.receiver.store.latest(SOURCE.name, "work_order")
    assert latest["wo-1"]["data"] == {"status": statuses[-1]}
    assert harness.receiver.store.count() == len(statuses)
    assert harness.forwarder.counters.duplicates == 0
    ids = [r.ids[0] for r in results]
    assert len(set(ids)) == len(statuses)
    assert harness.receiver.store.ids() == set(ids)
    assert latest["wo-1"]["id"] == ids[-1]
    # The same through the receiver's API.
    async with httpx.AsyncClient(base_url=harness.receiver.url) as client:
        got = await client.get(
            "/v1/latest",
            params={"source": SOURCE.name, "entity_type": "work_order"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    assert [r["data"] for r in got.json()["records"]] == [{"status": statuses[-1]}]


async def test_after_an_outbox_loss_unchanged_entities_are_sent_again_with_new_ids(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A fresh outbox (a corrupt one was moved aside) has a new epoch: what a re-sync
    appends again gets new ids, so it is never dropped as a duplicate of an older id."""
    settings = make_settings(tmp_path, receiver.url)
    sent: list[str | None] = []
    for name, statuses in (("one.db", "AB"), ("two.db", "B")):
        async with Outbox(tmp_path / name) as box:
            forwarder = Forwarder(box, settings.upstream, "agent-test")
            await forwarder.start()
            try:
                for status in statuses:
                    sent += (await box.append([wo_version("wo-1", status)])).ids
                await wait_for(lambda b=box: _drained(b), what="delivered")
            finally:
                await forwarder.stop()
    assert len(set(sent)) == 3
    assert receiver.store.ids() == set(sent)
    assert receiver.store.stats()["duplicates"] == 0
    latest = receiver.store.latest(SOURCE.name, "work_order")
    assert (latest["wo-1"]["id"], latest["wo-1"]["data"]) == (sent[-1], {"status": "B"})


async def _drained(box: Outbox) -> bool:
    return sum((await box.stats()).rows.values()) == 0
