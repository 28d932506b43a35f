"""The reference receiver: Upstream API v1 as a runnable server (Starlette + uvicorn).

``edge-agent receiver --listen 127.0.0.1:8480 --db receiver.db --token TOKEN`` serves

* ``POST /v1/ingest``: validates envelopes, stores them idempotently by ``id`` in SQLite
  and answers ``{"accepted", "duplicates", "rejected"}`` (docs/upstream-api.md);
* ``GET /v1/records`` (cursor pagination), ``GET /v1/latest`` (the latest version of
  every entity, by the rule below) and ``GET /v1/stats``;
* ``GET/POST /v1/_faults``: fault injection for tests and demos (fail rate, a fixed
  status for the next N requests, latency, poison-record rejection, body limit, token
  rotation), settable at start by CLI flags too;
* ``GET /healthz``.

The latest version of an entity is the last record of its ``entity_id`` that was
accepted (a new ``id``), in arrival order. The agent delivers one entity's records in the
order it appended them and never two batches with one entity at once, so arrival order
is append order; ``seq`` confirms it within one outbox but is not compared across
records, because a fresh outbox (after a corrupt one was moved aside) counts from 1
again. A duplicate (an id seen before) changes nothing.

Tests use it in-process: ``async with running_receiver(path, token="t") as rx:`` starts it
on a free port of 127.0.0.1 and exposes ``rx.url``, ``rx.store`` and ``rx.faults``;
``await rx.stop()`` / ``await rx.start()`` simulate an outage on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import random
import re
import socket
import sqlite3
import ssl
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import orjson
import uvicorn
from pydantic import TypeAdapter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent.records import EntityType, Op

MAX_BODY_DEFAULT = 64 << 20  # decompressed; a real upstream would set its own
PAGE_MAX = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    arrival     INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    entity_id   TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    source      TEXT NOT NULL,
    remote_id   TEXT NOT NULL,
    seq         INTEGER,
    modified    REAL,
    agent_id    TEXT NOT NULL,
    batch_id    TEXT NOT NULL,
    received_at REAL NOT NULL,
    body        BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_type ON records(entity_type, arrival);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS latest (
    entity_id   TEXT PRIMARY KEY,
    arrival     INTEGER NOT NULL
) WITHOUT ROWID;
"""
# Each accepted record becomes its entity's latest: arrivals only grow, so within one
# batch the last record of an entity wins, as it does across batches.
_SET_LATEST = (
    "INSERT INTO latest (entity_id, arrival) SELECT entity_id, MAX(arrival) FROM records "
    "WHERE id IN (SELECT value FROM json_each(?)) GROUP BY entity_id "
    "ON CONFLICT(entity_id) DO UPDATE SET arrival = excluded.arrival"
)
_BUMP = (
    "INSERT INTO counters VALUES (?, ?) "
    "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value"
)


# ---------------------------------------------------------------------- validation

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "entity_id": str,
    "entity_type": str,
    "op": str,
    "source": dict,
    "remote_id": str,
    "observed_at": str,
    "content_hash": str,
    "data": dict,
}
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "seq": int,
    "custom": dict,
    "remote_data": dict,
    "source_modified_at": str,
    "modified_precision": str,
}
_ENTITY_TYPES = frozenset(e.value for e in EntityType)
_OPS = frozenset(o.value for o in Op)


def validate(record: Any) -> str | None:
    """Why ``record`` is not a valid v1 envelope, or None when it is."""
    if not isinstance(record, dict):
        return "record is not an object"
    for key, kind in _REQUIRED.items():
        if key not in record:
            return f"missing field {key!r}"
        if not isinstance(record[key], kind):
            return f"field {key!r} has the wrong type"
    for key, kind in _OPTIONAL.items():
        value = record.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"field {key!r} has the wrong type"
    if record["entity_type"] not in _ENTITY_TYPES:
        return f"unknown entity_type {record['entity_type']!r}"
    if record["op"] not in _OPS:
        return f"unknown op {record['op']!r}"
    source = record["source"]
    if not isinstance(source.get("name"), str) or not isinstance(source.get("system"), str):
        return "source needs string 'name' and 'system'"
    return None


def _epoch(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# ---------------------------------------------------------------------- store


class Store:
    """The receiver's SQLite store: one row per record ``id`` (idempotent)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # The id index takes random inserts (uuids): keep it in memory past a million rows.
        self._db.execute("PRAGMA cache_size=-131072")
        self._db.executescript(_SCHEMA)
        if self._db.execute("SELECT NOT EXISTS (SELECT 1 FROM latest)").fetchone()[0]:
            # A store written before `latest` existed: derive it once from the records.
            self._db.execute(
                "INSERT OR IGNORE INTO latest SELECT entity_id, MAX(arrival) FROM records "
                "GROUP BY entity_id"
            )

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def bump(self, counts: dict[str, int]) -> None:
        """Add to named counters."""
        with self._lock:
            self._db.executemany(_BUMP, [(k, v) for k, v in counts.items() if v])

    def ingest(
        self, agent_id: str, batch_id: str, records: list[dict[str, Any]]
    ) -> tuple[list[str], list[str]]:
        """Store new records; return ``(accepted, duplicates)`` ids."""
        now = time.time()
        with self._lock:
            ids = orjson.dumps([r["id"] for r in records]).decode()
            known = {
                row[0]
                for row in self._db.execute(
                    "SELECT id FROM records WHERE id IN (SELECT value FROM json_each(?))", (ids,)
                )
            }
            accepted: list[str] = []
            duplicates: list[str] = []
            rows = []
            for rec in records:
                rid = rec["id"]
                if rid in known:
                    duplicates.append(rid)
                    continue
                known.add(rid)
                accepted.append(rid)
                modified = _epoch(rec.get("source_modified_at") or rec.get("observed_at"))
                rows.append(
                    (rid, rec["entity_id"], rec["entity_type"], rec["source"]["name"],
                     rec["remote_id"], rec.get("seq"), modified, agent_id, batch_id, now,
                     orjson.dumps(rec))
                )  # fmt: skip
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO records (id, entity_id, entity_type, source, remote_id, seq, "
                "modified, agent_id, batch_id, received_at, body) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            if accepted:
                self._db.execute(_SET_LATEST, (orjson.dumps(accepted).decode(),))
            self._db.executemany(
                _BUMP, [("accepted", len(accepted)), ("duplicates", len(duplicates))]
            )
            self._db.execute("COMMIT")
        return accepted, duplicates

    def page(
        self,
        entity_type: str | None,
        modified_after: float | None,
        cursor: int,
        limit: int,
    ) -> tuple[list[bytes], int | None]:
        """Records after ``cursor`` (an arrival number), oldest first; and the next cursor."""
        where, args = ["arrival > ?"], [cursor]
        if entity_type:
            where.append("entity_type = ?")
            args.append(entity_type)  # type: ignore[arg-type]
        if modified_after is not None:
            where.append("modified > ?")
            args.append(modified_after)  # type: ignore[arg-type]
        sql = (
            f"SELECT arrival, body FROM records WHERE {' AND '.join(where)} "
            "ORDER BY arrival LIMIT ?"
        )
        return self._paged(sql, args, limit)

    def _paged(self, sql: str, args: list[Any], limit: int) -> tuple[list[bytes], int | None]:
        """Run ``sql`` (``(position, body)`` rows, ``LIMIT ?`` last) for one page."""
        with self._lock:
            rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return [bytes(b) for _, b in rows], (rows[-1][0] if more else None)

    def latest_page(
        self, source: str | None, entity_type: str | None, cursor: int, limit: int
    ) -> tuple[list[bytes], int | None]:
        """The latest version of each entity (deletes included), by when it became the
        latest, after ``cursor``; and the next cursor."""
        where, args = ["l.arrival > ?"], [cursor]
        for column, value in (("source", source), ("entity_type", entity_type)):
            if value:
                where.append(f"r.{column} = ?")
                args.append(value)  # type: ignore[arg-type]
        sql = (
            "SELECT l.arrival, r.body FROM latest l JOIN records r ON r.arrival = l.arrival "
            f"WHERE {' AND '.join(where)} ORDER BY l.arrival LIMIT ?"
        )
        return self._paged(sql, args, limit)

    def stats(self) -> dict[str, Any]:
        """Counts per source and entity type, plus the counters."""
        with self._lock:
            total = self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
            by_source = dict(
                self._db.execute("SELECT source, COUNT(*) FROM records GROUP BY source")
            )
            by_type = dict(
                self._db.execute("SELECT entity_type, COUNT(*) FROM records GROUP BY entity_type")
            )
            counters = dict(self._db.execute("SELECT name, value FROM counters"))
        return {
            "records": total,
            "by_source": by_source,
            "by_entity_type": by_type,
            "duplicates": counters.get("duplicates", 0),
            "rejected": counters.get("rejected", 0),
            "requests": {
                k.removeprefix("status:"): v for k, v in counters.items() if k.startswith("status:")
            },
            "faults_injected": counters.get("faults_injected", 0),
        }

    # Helpers for tests and benchmarks.

    def count(self) -> int:
        """How many distinct records are stored."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def ids(self) -> set[str]:
        """Every stored record id."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT id FROM records")}

    def latest(self, source: str, entity_type: str) -> dict[str, dict[str, Any]]:
        """``remote_id`` -> the latest envelope of every entity of ``source`` and
        ``entity_type`` (``op`` says whether it is a delete), by the module's rule."""
        with self._lock:
            rows = self._db.execute(
                "SELECT r.remote_id, r.body FROM latest l JOIN records r "
                "ON r.arrival = l.arrival WHERE r.source = ? AND r.entity_type = ?",
                (source, entity_type),
            ).fetchall()
        return {remote_id: orjson.loads(body) for remote_id, body in rows}

    def order_violations(self) -> list[str]:
        """Entities whose records arrived out of ``seq`` order (should be none).

        Meaningful within one outbox's life: a fresh outbox counts ``seq`` from 1 again.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT entity_id FROM (SELECT entity_id, seq, LAG(seq) OVER "
                "(PARTITION BY entity_id ORDER BY arrival) AS prev FROM records) "
                "WHERE prev IS NOT NULL AND seq <= prev GROUP BY entity_id"
            ).fetchall()
        return [r[0] for r in rows]


# ---------------------------------------------------------------------- faults


@dataclass
class Faults:
    """Injected faults; every field can be set at start (CLI) and at runtime (admin API)."""

    fail_rate: float = 0.0
    """Fraction of ingest requests answered with ``fail_status``."""
    fail_status: int = 503
    """Status of random failures."""
    status: int | None = None
    """Answer the next ``status_count`` ingest requests with this status."""
    status_count: int = 0
    """How many requests still get ``status``."""
    retry_after: str | None = None
    """``Retry-After`` sent with injected failures (seconds or an HTTP-date)."""
    latency: float = 0.0
    """Seconds to wait before answering (after storing: the answer comes late)."""
    latency_count: int | None = None
    """How many requests still get ``latency`` (None: every request)."""
    reject_pattern: str | None = None
    """Regex: records whose ``id`` or ``remote_id`` match are refused."""
    reject_mode: Literal["record", "batch"] = "record"
    """``record``: listed in ``rejected``; ``batch``: the whole batch gets a 400."""
    max_body_bytes: int | None = None
    """Answer 413 to request bodies (as sent on the wire) larger than this."""
    omit_pattern: str | None = None
    """Regex: matching records are stored but left out of the answer (a buggy upstream)."""
    omit_count: int = 1
    """How many answers still omit them."""

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update; unknown keys or wrong types raise ValueError."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown fault(s): {sorted(unknown)}")
        new = TypeAdapter(Faults).validate_python({**asdict(self), **changes})
        for pattern in (new.reject_pattern, new.omit_pattern):
            if pattern:
                re.compile(pattern)
        for f in fields(self):
            setattr(self, f.name, getattr(new, f.name))


# ---------------------------------------------------------------------- app


def _json(body: Any, status: int = 200, request_id: str | None = None) -> Response:
    headers = {"X-API-Version": "1"}
    if request_id:
        headers["X-Request-ID"] = request_id
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def _error(status: int, code: str, message: str, request_id: str, **headers: str) -> Response:
    response = _json({"error": {"code": code, "message": message, "request_id": request_id}},
                     status, request_id)  # fmt: skip
    response.headers.update(headers)
    return response


class BadRequest(Exception):
    """A request error answered with a status and an error body."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class Receiver:
    """The receiver application: store, faults, tokens, and its uvicorn server."""

    def __init__(
        self,
        store: Store,
        token: str,
        *,
        admin_token: str | None = None,
        faults: Faults | None = None,
        max_body: int = MAX_BODY_DEFAULT,
    ) -> None:
        self.store = store
        self.token = token
        self.admin_token = admin_token or token
        self.faults = faults or Faults()
        self.max_body = max_body
        self._serial = asyncio.Lock()
        self.log: deque[dict[str, Any]] = deque(maxlen=10_000)
        """The latest ingest requests (time, status, headers), for tests."""
        self.app = Starlette(
            routes=[
                Route("/v1/ingest", self.ingest, methods=["POST"]),
                Route("/v1/records", self.records, methods=["GET"]),
                Route("/v1/latest", self.latest, methods=["GET"]),
                Route("/v1/stats", self.stats, methods=["GET"]),
                Route("/v1/_faults", self.get_faults, methods=["GET"]),
                Route("/v1/_faults", self.set_faults, methods=["POST"]),
                Route("/healthz", self.healthz, methods=["GET"]),
            ]
        )
        self.host = "127.0.0.1"
        self.port = 0
        self.scheme = "http"
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._ssl: tuple[str, str] | None = None
        self._client_ca: str | None = None

    @property
    def url(self) -> str:
        """The base URL (what the agent's ``upstream.url`` is set to)."""
        return f"{self.scheme}://{self.host}:{self.port}"

    # ------------------------------------------------------------------ ingest

    async def ingest(self, request: Request) -> Response:
        """``POST /v1/ingest``."""
        rid = request.headers.get("x-request-id") or str(uuid.uuid4())
        try:
            response = await self._ingest(request, rid)
        except BadRequest as exc:
            headers = {"Retry-After": exc.retry_after} if exc.retry_after else {}
            response = _error(exc.status, exc.code, exc.message, rid, **headers)
        self.store.bump({f"status:{response.status_code}": 1})
        self.log.append(
            {"at": time.time(), "status": response.status_code, "headers": dict(request.headers)}
        )
        await self._delay()
        return response

    async def _ingest(self, request: Request, rid: str) -> Response:
        self._authorize(request, self.token)
        self._inject()
        if request.headers.get("x-api-version", "1") != "1":
            raise BadRequest(400, "unsupported_api_version", "this receiver speaks version 1")
        raw = await request.body()
        if self.faults.max_body_bytes is not None and len(raw) > self.faults.max_body_bytes:
            raise BadRequest(413, "payload_too_large", f"body over {self.faults.max_body_bytes}")
        agent_id, batch_id, records = self._parse(raw, request.headers.get("content-encoding"))
        rejected, good = self._screen(records)
        async with self._serial:  # one writer: "accepted" vs "duplicates" stays exact
            accepted, duplicates = await asyncio.to_thread(
                self.store.ingest, agent_id, batch_id, good
            )
        self.store.bump({"rejected": len(rejected)})
        if self.faults.omit_pattern and self.faults.omit_count > 0:
            self.faults.omit_count -= 1
            omit = re.compile(self.faults.omit_pattern)
            accepted = [i for i in accepted if not omit.search(i)]
            duplicates = [i for i in duplicates if not omit.search(i)]
        body = {"accepted": accepted, "duplicates": duplicates, "rejected": rejected}
        return _json(body, 200, rid)

    def _authorize(self, request: Request, token: str) -> None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise BadRequest(401, "unauthorized", "missing or invalid bearer token")

    def _inject(self) -> None:
        f = self.faults
        if f.status is not None and f.status_count > 0:
            f.status_count -= 1
            self.store.bump({"faults_injected": 1})
            raise BadRequest(
                f.status, "injected", f"injected fault: HTTP {f.status}", f.retry_after
            )
        if f.fail_rate > 0 and random.random() < f.fail_rate:  # noqa: S311
            self.store.bump({"faults_injected": 1})
            raise BadRequest(
                f.fail_status, "injected", f"injected fault: HTTP {f.fail_status}", f.retry_after
            )

    async def _delay(self) -> None:
        f = self.faults
        if f.latency <= 0 or f.latency_count == 0:
            return
        if f.latency_count is not None:
            f.latency_count -= 1
        await asyncio.sleep(f.latency)

    def _parse(self, raw: bytes, encoding: str | None) -> tuple[str, str, list[Any]]:
        if encoding == "gzip":
            try:
                inflater = zlib.decompressobj(wbits=31)
                raw = inflater.decompress(raw, self.max_body)
                if inflater.unconsumed_tail:
                    raise BadRequest(413, "payload_too_large", "decompressed body too large")
            except zlib.error as exc:
                raise BadRequest(400, "invalid_encoding", f"bad gzip body: {exc}") from None
        elif encoding not in (None, "identity"):
            raise BadRequest(415, "unsupported_encoding", f"unsupported encoding {encoding}")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(400, "invalid_json", str(exc)) from None
        if not isinstance(body, dict):
            raise BadRequest(400, "invalid_batch", "body must be an object")
        agent_id, batch_id, records = (body.get(k) for k in ("agent_id", "batch_id", "records"))
        if not isinstance(agent_id, str) or not isinstance(batch_id, str):
            raise BadRequest(400, "invalid_batch", "agent_id and batch_id must be strings")
        if not isinstance(records, list):
            raise BadRequest(400, "invalid_batch", "records must be a list")
        for rec in records:
            if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                raise BadRequest(400, "invalid_batch", "every record needs a string id")
        return agent_id, batch_id, records

    def _poison(self, record: dict[str, Any], pattern: re.Pattern[str] | None) -> bool:
        """Does the reject pattern refuse this (valid) record?"""
        if pattern is None:
            return False
        return bool(pattern.search(record["id"]) or pattern.search(str(record["remote_id"])))

    def _screen(self, records: list[dict[str, Any]]) -> tuple[list[dict[str, str]], list[Any]]:
        """Split records into rejected (with reasons) and good ones."""
        pattern = re.compile(self.faults.reject_pattern) if self.faults.reject_pattern else None
        rejected: list[dict[str, str]] = []
        good = []
        for rec in records:
            problem = validate(rec)
            if problem is None and self._poison(rec, pattern):
                if self.faults.reject_mode == "batch":
                    raise BadRequest(400, "poison_record", f"record {rec['id']} is refused")
                message = "refused by the receiver's reject pattern"
                rejected.append({"id": rec["id"], "code": "poison", "message": message})
                continue
            if problem is not None:
                rejected.append({"id": rec["id"], "code": "invalid_record", "message": problem})
            else:
                good.append(rec)
        return rejected, good

    # ------------------------------------------------------------------ reads, admin

    async def records(self, request: Request) -> Response:
        """``GET /v1/records?entity_type=&modified_after=&cursor=&limit=``."""
        q = request.query_params
        after = _epoch(q.get("modified_after"))
        if q.get("modified_after") and after is None:
            bad = BadRequest(400, "invalid_parameter", "modified_after is not RFC 3339")
            return await self._page(request, self.store.page, problem=bad)
        return await self._page(
            request,
            lambda cursor, limit: self.store.page(q.get("entity_type"), after, cursor, limit),
        )

    async def latest(self, request: Request) -> Response:
        """``GET /v1/latest?source=&entity_type=&cursor=&limit=``."""
        q = request.query_params
        return await self._page(
            request,
            lambda cursor, limit: self.store.latest_page(
                q.get("source"), q.get("entity_type"), cursor, limit
            ),
        )

    async def _page(
        self,
        request: Request,
        fetch: Callable[..., tuple[list[bytes], int | None]],
        *,
        problem: BadRequest | None = None,
    ) -> Response:
        """One page of ``fetch(cursor, limit)`` (a store read, run in a thread) as JSON;
        ``problem`` (a bad parameter) is answered after the token was checked."""
        rid = request.headers.get("x-request-id") or str(uuid.uuid4())
        q = request.query_params
        try:
            self._authorize_read(request)
            if problem is not None:
                raise problem
            limit = min(max(1, int(q.get("limit", "100"))), PAGE_MAX)
            cursor = int(q.get("cursor") or 0)
        except ValueError:
            return _error(400, "invalid_parameter", "limit and cursor are integers", rid)
        except BadRequest as exc:
            return _error(exc.status, exc.code, exc.message, rid)
        bodies, nxt = await asyncio.to_thread(fetch, cursor, limit)
        content = b'{"records":[' + b",".join(bodies) + b'],"next_cursor":'
        content += orjson.dumps(None if nxt is None else str(nxt)) + b"}"
        return Response(content, 200, {"X-Request-ID": rid}, media_type="application/json")

    def _authorize_read(self, request: Request) -> None:
        try:
            self._authorize(request, self.admin_token)
        except BadRequest:
            self._authorize(request, self.token)

    async def stats(self, request: Request) -> Response:
        """``GET /v1/stats``."""
        rid = request.headers.get("x-request-id") or str(uuid.uuid4())
        try:
            self._authorize_read(request)
        except BadRequest as exc:
            return _error(exc.status, exc.code, exc.message, rid)
        return _json(await asyncio.to_thread(self.store.stats), 200, rid)

    async def get_faults(self, request: Request) -> Response:
        """``GET /v1/_faults``: the current faults (admin token)."""
        rid = request.headers.get("x-request-id") or str(uuid.uuid4())
        try:
            self._authorize(request, self.admin_token)
        except BadRequest as exc:
            return _error(exc.status, exc.code, exc.message, rid)
        return _json(asdict(self.faults), 200, rid)

    async def set_faults(self, request: Request) -> Response:
        """``POST /v1/_faults``: a partial update; ``{"reset": true}`` clears all;
        ``{"token": "..."}`` rotates the ingest token."""
        rid = request.headers.get("x-request-id") or str(uuid.uuid4())
        try:
            self._authorize(request, self.admin_token)
            changes = orjson.loads(await request.body())
            if not isinstance(changes, dict):
                raise TypeError("body must be an object")
            if changes.pop("reset", False):
                self.faults = Faults()
            if "token" in changes:
                self.token = str(changes.pop("token"))
            self.faults.update(changes)
        except BadRequest as exc:
            return _error(exc.status, exc.code, exc.message, rid)
        except (ValueError, TypeError, re.error) as exc:
            return _error(400, "invalid_faults", str(exc), rid)
        return _json(asdict(self.faults), 200, rid)

    async def healthz(self, request: Request) -> Response:
        """``GET /healthz``."""
        return _json({"ok": True})

    # ------------------------------------------------------------------ server

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        ssl_client_ca: str | None = None,
    ) -> None:
        """Serve on ``host:port`` (0: a free port, kept for later restarts).

        With ``ssl_certfile`` it serves HTTPS; with ``ssl_client_ca`` too, it requires a
        client certificate signed by that CA (mutual TLS).
        """
        if ssl_certfile is not None:
            self._ssl = (ssl_certfile, ssl_keyfile or ssl_certfile)
            self._client_ca = ssl_client_ca
        self.scheme = "https" if self._ssl else "http"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
        # without it every keep-alive answer waits ~40 ms for a delayed ACK (Nagle).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port or self.port))
        self.host, self.port = host, sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=2,
            ssl_certfile=self._ssl[0] if self._ssl else None,
            ssl_keyfile=self._ssl[1] if self._ssl else None,
            ssl_ca_certs=self._client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if self._client_ca else ssl.CERT_NONE,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                await self._task
                raise RuntimeError("receiver did not start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop serving (the store stays open; ``start()`` serves again on the same port)."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        self._server = self._task = None

    async def serve_forever(self, host: str, port: int, **tls: str | None) -> None:
        """Serve until cancelled or the server exits (the CLI)."""
        await self.start(host, port, **tls)
        assert self._task is not None
        await self._task


@contextlib.asynccontextmanager
async def running_receiver(
    db: Path | str,
    token: str = "test-token",  # noqa: S107 - a test fixture's default
    *,
    admin_token: str | None = None,
    faults: Faults | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    ssl_client_ca: str | None = None,
) -> AsyncIterator[Receiver]:
    """Run a receiver on a free port of 127.0.0.1 for the duration of the block."""
    store = Store(db)
    rx = Receiver(store, token, admin_token=admin_token, faults=faults)
    await rx.start(ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, ssl_client_ca=ssl_client_ca)
    try:
        yield rx
    finally:
        await rx.stop()
        store.close()
