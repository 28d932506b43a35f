"""The reference receiver: the upstream contract as a server (validation, storage, reads,
fault injection, CLI)."""

from __future__ import annotations

import gzip
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from upstream_support import (  # fixtures are used by name
    SOURCE,
    TOKEN,
    make_records,
    receiver_fixture,  # noqa: F401
)

from agent.receiver import Receiver, Store, validate
from agent.records import EntityType, Record

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": f"Bearer {TOKEN}", "X-Request-ID": "req-1"}
ADMIN = {"Authorization": "Bearer admin"}


def envelope(record: Record, seq: int = 1) -> dict[str, Any]:
    return orjson.loads(record.to_json()) | {"seq": seq}


def batch(*records: dict[str, Any]) -> bytes:
    return orjson.dumps({"agent_id": "a", "batch_id": "b", "records": list(records)})


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"id": 5}, "field 'id' has the wrong type"),
        ({"entity_type": "spaceship"}, "unknown entity_type 'spaceship'"),
        ({"op": "merge"}, "unknown op 'merge'"),
        ({"data": []}, "field 'data' has the wrong type"),
        ({"seq": "1"}, "field 'seq' has the wrong type"),
        ({"seq": True}, "field 'seq' has the wrong type"),
        ({"source": {"name": "x"}}, "source needs string 'name' and 'system'"),
        ({"remote_data": None}, None),
    ],
)
def test_validate(change: dict[str, Any], problem: str | None) -> None:
    good = envelope(make_records(1)[0])
    assert validate(good) is None
    assert validate(good | change) == problem


def test_validate_missing_field() -> None:
    good = envelope(make_records(1)[0])
    del good["content_hash"]
    assert validate(good) == "missing field 'content_hash'"


async def _post(rx: Receiver, content: bytes, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(rx.url + "/v1/ingest", content=content, headers=headers)


async def test_ingest_answers_accepted_duplicates_rejected(receiver: Receiver) -> None:
    a, b = (envelope(r, i) for i, r in enumerate(make_records(2)))
    bad = envelope(make_records(1, start=9)[0]) | {"entity_type": "spaceship"}
    first = await _post(receiver, batch(a, bad), **AUTH)
    assert first.status_code == 200
    assert first.headers["x-request-id"] == "req-1"
    assert first.json() == {
        "accepted": [a["id"]],
        "duplicates": [],
        "rejected": [
            {
                "id": bad["id"],
                "code": "invalid_record",
                "message": "unknown entity_type 'spaceship'",
            }
        ],
    }
    second = await _post(
        receiver, gzip.compress(batch(a, b)), **AUTH, **{"Content-Encoding": "gzip"}
    )
    assert second.json() == {"accepted": [b["id"]], "duplicates": [a["id"]], "rejected": []}
    stats = receiver.store.stats()
    assert stats["records"] == 2
    assert stats["duplicates"] == 1
    assert stats["rejected"] == 1
    assert stats["by_source"] == {SOURCE.name: 2}
    assert stats["by_entity_type"] == {"work_order": 2}


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b"{}", {}, 401, "unauthorized"),
        (b"not json", AUTH, 400, "invalid_json"),
        (b'{"agent_id": "a", "batch_id": "b"}', AUTH, 400, "invalid_batch"),
        (b'{"agent_id": "a", "batch_id": "b", "records": [{}]}', AUTH, 400, "invalid_batch"),
        (b"\x1f\x8bgarbage", {**AUTH, "Content-Encoding": "gzip"}, 400, "invalid_encoding"),
        (b"{}", {**AUTH, "X-API-Version": "2"}, 400, "unsupported_api_version"),
    ],
)
async def test_error_bodies(
    receiver: Receiver, content: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    response = await _post(receiver, content, **headers)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]


async def test_records_pagination_and_filters(receiver: Receiver) -> None:
    records = [envelope(r, i) for i, r in enumerate(make_records(25))]
    reading = Record.reading(
        SOURCE,
        EntityType.METER_READING,
        "m1",
        __import__("datetime").datetime(2030, 1, 1),
        {"v": 1},
    )
    assert (
        await _post(receiver, batch(*records, envelope(reading, 99)), **AUTH)
    ).status_code == 200
    seen: list[str] = []
    cursor = ""
    async with httpx.AsyncClient(base_url=receiver.url, headers=AUTH) as client:
        while True:
            page = (
                await client.get(
                    "/v1/records",
                    params={"entity_type": "work_order", "limit": 10, "cursor": cursor},
                )
            ).json()
            seen += [r["id"] for r in page["records"]]
            if page["next_cursor"] is None:
                break
            cursor = page["next_cursor"]
        assert seen == [r["id"] for r in records]
        later = (
            await client.get("/v1/records", params={"modified_after": "2029-12-31T00:00:00Z"})
        ).json()
        assert [r["id"] for r in later["records"]] == [reading.id]
        bad = await client.get("/v1/records", params={"limit": "ten"})
        assert bad.status_code == 400
        stats = (await client.get("/v1/stats")).json()
        assert stats["by_entity_type"] == {"work_order": 25, "meter_reading": 1}
        assert (
            await client.get("/v1/stats", headers={"Authorization": "Bearer nope"})
        ).status_code == 401


async def test_latest_is_the_last_accepted_version_per_entity(receiver: Receiver) -> None:
    """By arrival, whatever the seq (a fresh outbox counts from 1 again); a duplicate,
    however late, changes nothing; a delete as latest is shown as such."""
    a1, b1, a2, b2 = (envelope(r, 5 + i) for i, r in enumerate(make_records(4, entities=2)))
    b2 = b2 | {"op": "delete"}
    assert (await _post(receiver, batch(a1, b1, a2), **AUTH)).status_code == 200
    assert receiver.store.latest(SOURCE.name, "work_order")["wo-0"]["id"] == a2["id"]
    after_loss = a1 | {"id": "3b0d4c6e-7f8a-5b9c-8d0e-1f2a3b4c5d6e", "seq": 1}
    assert (await _post(receiver, batch(a1, after_loss, b2), **AUTH)).status_code == 200
    latest = receiver.store.latest(SOURCE.name, "work_order")
    assert {k: (v["id"], v["op"]) for k, v in latest.items()} == {
        "wo-0": (after_loss["id"], "upsert"),
        "wo-1": (b2["id"], "delete"),
    }
    assert receiver.store.latest(SOURCE.name, "asset") == {}
    assert receiver.store.latest("other", "work_order") == {}
    async with httpx.AsyncClient(base_url=receiver.url, headers=AUTH) as client:
        seen, cursor = [], ""
        while True:
            page = (await client.get("/v1/latest", params={"limit": 1, "cursor": cursor})).json()
            seen += [r["id"] for r in page["records"]]
            if page["next_cursor"] is None:
                break
            cursor = page["next_cursor"]
        assert seen == [after_loss["id"], b2["id"]]  # by when each became the latest
        one = await client.get("/v1/latest", params={"source": "other"})
        assert one.json() == {"records": [], "next_cursor": None}
        assert (await client.get("/v1/latest", params={"cursor": "x"})).status_code == 400
        denied = await client.get("/v1/latest", headers={"Authorization": "Bearer nope"})
        assert denied.status_code == 401


async def test_a_store_from_before_latest_gets_it_from_its_records(tmp_path: Path) -> None:
    path = tmp_path / "rx.db"
    store = Store(path)
    a1, a2 = (envelope(r, s) for r, s in zip(make_records(2, entities=1), [1, 2], strict=True))
    store.ingest("agent", "b", [a1, a2])
    store.close()
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("DROP TABLE latest")
    con.close()
    store = Store(path)
    try:
        assert store.latest(SOURCE.name, "work_order")["wo-0"]["id"] == a2["id"]
    finally:
        store.close()


async def test_fault_admin_endpoint(receiver: Receiver) -> None:
    one = batch(envelope(make_records(1)[0]))
    async with httpx.AsyncClient(base_url=receiver.url) as client:
        assert (
            await client.post("/v1/_faults", json={"latency": 1}, headers=AUTH)
        ).status_code == 401
        bad = await client.post("/v1/_faults", json={"latency": "slow"}, headers=ADMIN)
        assert bad.status_code == 400
        assert (
            await client.post("/v1/_faults", json={"nope": 1}, headers=ADMIN)
        ).status_code == 400
        ok = await client.post(
            "/v1/_faults",
            json={"status": 503, "status_count": 2, "retry_after": "7"},
            headers=ADMIN,
        )
        assert ok.json()["status_count"] == 2
        for _ in range(2):
            r = await client.post("/v1/ingest", content=one, headers=AUTH)
            assert (r.status_code, r.headers["retry-after"]) == (503, "7")
        assert (await client.post("/v1/ingest", content=one, headers=AUTH)).status_code == 200
        await client.post("/v1/_faults", json={"token": "new"}, headers=ADMIN)
        assert (await client.post("/v1/ingest", content=one, headers=AUTH)).status_code == 401
        new = {"Authorization": "Bearer new"}
        assert (await client.post("/v1/ingest", content=one, headers=new)).json()["duplicates"]
        await client.post("/v1/_faults", json={"max_body_bytes": 10}, headers=ADMIN)
        assert (await client.post("/v1/ingest", content=one, headers=new)).status_code == 413
        reset = await client.post("/v1/_faults", json={"reset": True}, headers=ADMIN)
        assert reset.json()["max_body_bytes"] is None
        assert receiver.store.stats()["faults_injected"] == 2


def test_cli_receiver_serves(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "receiver", "--listen", f"127.0.0.1:{port}",
         "--db", str(tmp_path / "rx.db"), "--token", TOKEN, "--status", "500"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url + "/healthz")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "receiver did not start"
                time.sleep(0.05)
        one = batch(envelope(make_records(1)[0]))
        assert httpx.post(url + "/v1/ingest", content=one, headers=AUTH).status_code == 500
        assert httpx.post(url + "/v1/ingest", content=one, headers=AUTH).status_code == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_cli_receiver_needs_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EDGE_AGENT_RECEIVER_TOKEN"}
    out = subprocess.run(
        [sys.executable, "-m", "agent", "receiver", "--db", str(tmp_path / "rx.db")],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--token" in out.stderr
