"""The upstream HTTPS sink (Upstream API v1, see docs/upstream-api.md).

:class:`HttpSink` posts leased outbox records to ``{url}/v1/ingest`` and turns the
answer into a :class:`WriteResult` or a typed error. Every answer, and every failure to
get one, is sorted by ONE function, :func:`classify`; the forwarder acts on its verdict
(ack, retry with backoff, wait for new credentials, split, bisect).
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import gzip
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from pydantic import SecretStr, field_validator, model_validator

from agent import __version__
from agent.configtypes import ByteSize, Duration, SecretFilePath, Section, secret_value, warn
from agent.errors import PermanentError, ReauthorizationRequired, TransientError
from agent.outbox import Leased


class UpstreamConfig(Section):
    """Where records go (``[upstream]``): the unified maintenance API."""

    url: str
    """Base URL of the upstream; records are POSTed to ``{url}/v1/ingest``."""
    token: SecretStr | None = None
    """Bearer token. Prefer ``token_file``."""
    token_file: SecretFilePath | None = None
    """File holding the bearer token (mode 600). Re-read on reload (SIGHUP)."""
    tls_verify: bool = True
    """Verify the upstream's certificate. Only turn off for a lab, never in production."""
    ca_file: Path | None = None
    """Extra CA bundle (PEM) to trust, for a corporate TLS-inspecting proxy or private CA."""
    client_cert_file: Path | None = None
    """Client certificate (PEM) for mutual TLS."""
    client_key_file: Path | None = None
    """Key of ``client_cert_file`` when it is not in the same file."""
    proxy: str | None = None
    """HTTP(S) proxy URL, e.g. ``http://proxy.plant.local:3128``."""
    connect_timeout: Duration = 10.0
    """Time allowed to open a connection."""
    read_timeout: Duration = 60.0
    """Time allowed for the upstream's answer."""
    batch_max_records: int = 1000
    """Most records in one request."""
    batch_max_bytes: ByteSize = 4 << 20
    """Most record bytes in one request (before compression)."""
    gzip_min_bytes: ByteSize = 8 << 10
    """Compress request bodies at least this large."""
    backoff_initial: Duration = 1.0
    """First retry delay after a transient failure (full-jitter exponential)."""
    backoff_cap: Duration = 300.0
    """Longest retry delay."""
    reauth_probe_interval: Duration = 300.0
    """While the token is refused (401/403): how often to probe again."""
    concurrency: int = 1
    """Requests in flight at once. Per-entity order holds at any value."""
    drain_timeout: Duration = 30.0
    """On shutdown: how long to keep delivering before exiting (the rest stays queued)."""

    @model_validator(mode="after")
    def _warn_unauthenticated(self) -> UpstreamConfig:
        if self.token is None and self.token_file is None and self.client_cert_file is None:
            warn(
                "upstream has no token, token_file or client certificate: "
                "requests will be unauthenticated"
            )
        if not self.tls_verify:
            warn("upstream.tls_verify is off: the upstream's identity is not checked")
        return self

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        url = httpx.URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"invalid upstream url {value!r} (write https://host[:port])")
        return value

    @model_validator(mode="after")
    def _check_tls_files(self) -> UpstreamConfig:
        # Load them now, so check-config and a reload refuse a bad file instead of the
        # forwarder failing on it later.
        try:
            ssl_context(self)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cannot load the TLS files (ca_file, client_cert_file): {exc}"
            ) from None
        return self

    @field_validator("concurrency", "batch_max_records")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value


RETRY_AFTER_MAX = 3600.0  # a Retry-After beyond an hour is taken as an hour
GZIP_LEVEL = 6
_THREAD_GZIP_BYTES = 256 << 10  # compress big bodies off the event loop
_ERROR_MESSAGE_MAX = 500
_ENDPOINT_PROBLEMS = frozenset({404, 405, 410})


class Action(enum.Enum):
    """What the forwarder does with an answer (see the table in docs/upstream-api.md)."""

    DELIVERED = "delivered"
    RETRY = "retry"
    REAUTHORIZE = "reauthorize"
    SPLIT = "split"
    BISECT = "bisect"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The classification of one attempt: the action and, for reauthorization, why."""

    action: Action
    reason: str | None = None


def classify(status: int | None, error: BaseException | None = None) -> Verdict:
    """Sort one attempt's outcome: THE retry classification of the upstream contract.

    ``status`` is the HTTP status (None when no answer came); ``error`` the transport
    error when there was one. Connect/read errors, 408, 429 and 5xx are transient; 401
    and 403 wait for new credentials; 413 splits the batch; any other 4xx bisects it to
    isolate the records the upstream refuses, except 404/405/410, which say the endpoint
    is wrong (not the records). A redirect or other unexpected status is a
    misconfiguration that may be fixed by a reload: retried.
    """
    if status is None:
        if error is None or isinstance(error, httpx.TransportError | OSError | TimeoutError):
            return Verdict(Action.RETRY)
        raise error
    if 200 <= status < 300:
        return Verdict(Action.DELIVERED)
    if status == 401:
        return Verdict(Action.REAUTHORIZE, "unauthorized")
    if status == 403:
        return Verdict(Action.REAUTHORIZE, "forbidden")
    if status in (408, 429) or status >= 500:
        return Verdict(Action.RETRY)
    if status in _ENDPOINT_PROBLEMS:
        # The URL or a proxy is wrong, not the records: bisecting would dead-letter the
        # whole outbox over a typo. Retry (visible in status) until config is fixed.
        return Verdict(Action.RETRY)
    if status == 413:
        return Verdict(Action.SPLIT)
    if 400 <= status < 500:
        return Verdict(Action.BISECT)
    return Verdict(Action.RETRY)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return min(float(text), RETRY_AFTER_MAX)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    base = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return min(max(0.0, (when - base).total_seconds()), RETRY_AFTER_MAX)


class BatchTooLarge(PermanentError):
    """HTTP 413: the upstream refuses a body this large; send smaller batches."""


class BatchRejected(PermanentError):
    """Another 4xx on the whole batch: something in it is refused (``code``, message)."""

    def __init__(
        self, message: str, *, status: int, code: str | None, request_id: str | None
    ) -> None:
        super().__init__(message, status=status, request_id=request_id)
        self.code = code


@dataclass(slots=True)
class Rejection:
    """A record the upstream refused, with its code and message."""

    id: str
    code: str
    message: str


@dataclass(slots=True)
class WriteResult:
    """What the upstream did with a batch (HTTP 200)."""

    accepted: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    status: int = 200
    request_id: str | None = None
    wire_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Payload:
    """A request body ready to post (compressed when large enough)."""

    batch_id: str
    content: bytes
    raw_bytes: int
    gzipped: bool


def encode_batch(agent_id: str, batch_id: str, records: Sequence[bytes]) -> bytes:
    """The ingest body, by byte concatenation of the envelopes (they are already JSON)."""
    return b"".join(
        (
            b'{"agent_id":',
            orjson.dumps(agent_id),
            b',"batch_id":',
            orjson.dumps(batch_id),
            b',"records":[',
            b",".join(records),
            b"]}",
        )
    )


def ssl_context(config: UpstreamConfig) -> ssl.SSLContext | bool:
    """TLS settings: verification on by default, extra CA bundle, client certificate."""
    if not config.tls_verify:
        return False
    ctx = httpx.create_ssl_context()
    if config.ca_file is not None:
        ctx.load_verify_locations(cafile=config.ca_file)
    if config.client_cert_file is not None:
        ctx.load_cert_chain(config.client_cert_file, config.client_key_file)
    return ctx


def _transport_settings(config: UpstreamConfig) -> tuple[Any, ...]:
    """The fields that need a new client when they change (the token does not)."""
    return (
        config.tls_verify,
        config.ca_file,
        config.client_cert_file,
        config.client_key_file,
        config.proxy,
        config.connect_timeout,
        config.read_timeout,
        config.concurrency,
    )


def _error_body(response: httpx.Response) -> tuple[str | None, str, str | None]:
    """``(code, message, request_id)`` from a ``{"error": {...}}`` body, if it is one."""
    try:
        err = orjson.loads(response.content)["error"]
        code, message, rid = err.get("code"), err.get("message"), err.get("request_id")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        text = response.text[:_ERROR_MESSAGE_MAX].strip()
        return None, text or response.reason_phrase, None
    return (
        code if isinstance(code, str) else None,
        str(message or response.reason_phrase)[:_ERROR_MESSAGE_MAX],
        rid if isinstance(rid, str) else None,
    )


def _parse_result(response: httpx.Response, request_id: str | None) -> WriteResult:
    """A 200 answer; a malformed one is a transient error (the upstream is broken)."""
    try:
        body = orjson.loads(response.content)
        result = WriteResult(
            accepted=[str(i) for i in body.get("accepted", [])],
            duplicates=[str(i) for i in body.get("duplicates", [])],
            rejected=[
                Rejection(str(r["id"]), str(r.get("code", "rejected")), str(r.get("message", "")))
                for r in body.get("rejected", [])
            ],
            status=response.status_code,
            request_id=request_id,
        )
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
        raise TransientError(
            f"invalid answer from upstream: {exc}",
            status=response.status_code,
            request_id=request_id,
        ) from None
    return result


def _transport_label(exc: httpx.HTTPError) -> str:
    """A short counter key for a failure without an answer."""
    if isinstance(exc, httpx.ConnectTimeout):
        return "connect_timeout"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect_error"
    if isinstance(exc, httpx.ProxyError):
        return "proxy_error"
    return "transport_error"


def proxy_label(proxy: str) -> str:
    """The proxy as ``scheme://host:port``, for messages: never its credentials."""
    parts = urlsplit(proxy)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


class HttpSink:
    """Posts batches to ``{url}/v1/ingest`` over one keep-alive :class:`httpx.AsyncClient`.

    ``write`` returns a :class:`WriteResult` (HTTP 2xx) or raises :class:`TransientError`,
    :class:`ReauthorizationRequired`, :class:`BatchTooLarge` or :class:`BatchRejected`
    according to :func:`classify`. The token is read from the config on every attempt, so
    :meth:`reconfigure` with a new token takes effect on the very next request.
    """

    def __init__(self, config: UpstreamConfig, agent_id: str) -> None:
        self.config = config
        self.agent_id = agent_id
        self._client = self._build(config)
        self._retired: list[httpx.AsyncClient] = []
        self.requests: dict[str, int] = {}
        """Attempts by outcome: HTTP status code, or connect_error, timeout, ..."""
        self.wire_bytes = 0
        self.last_request_id: str | None = None

    @staticmethod
    def _build(config: UpstreamConfig) -> httpx.AsyncClient:
        keep = max(1, config.concurrency)
        return httpx.AsyncClient(
            verify=ssl_context(config),
            proxy=config.proxy,
            timeout=httpx.Timeout(
                config.read_timeout, connect=config.connect_timeout, pool=config.read_timeout
            ),
            limits=httpx.Limits(max_connections=keep + 1, max_keepalive_connections=keep + 1),
            headers={"User-Agent": f"edge-agent/{__version__}", "X-API-Version": "1"},
            follow_redirects=False,
        )

    def reconfigure(self, config: UpstreamConfig, agent_id: str) -> None:
        """Apply a reloaded config: a new token at once; TLS/proxy/timeouts via a new client."""
        if _transport_settings(config) != _transport_settings(self.config):
            # Requests in flight finish on the old client; it is closed with the sink.
            self._retired.append(self._client)
            self._client = self._build(config)
        self.config = config
        self.agent_id = agent_id

    async def aclose(self) -> None:
        """Close every connection."""
        for client in (*self._retired, self._client):
            await client.aclose()
        self._retired.clear()

    @property
    def url(self) -> str:
        """The ingest endpoint."""
        return self.config.url.rstrip("/") + "/v1/ingest"

    async def prepare(self, batch: Sequence[Leased], batch_id: str | None = None) -> Payload:
        """Build (and compress when large) the body of ``batch``."""
        bid = batch_id or str(uuid.uuid4())
        raw = encode_batch(self.agent_id, bid, [item.body for item in batch])
        if len(raw) < self.config.gzip_min_bytes:
            return Payload(bid, raw, len(raw), gzipped=False)
        if len(raw) >= _THREAD_GZIP_BYTES:
            packed = await asyncio.to_thread(gzip.compress, raw, GZIP_LEVEL, mtime=0)
        else:
            packed = gzip.compress(raw, GZIP_LEVEL, mtime=0)
        return Payload(bid, packed, len(raw), gzipped=True)

    async def write(self, batch: Sequence[Leased], *, batch_id: str | None = None) -> WriteResult:
        """Send ``batch`` once. ``batch_id`` (the Idempotency-Key) is kept across retries."""
        payload = await self.prepare(batch, batch_id)
        return await self.post(payload)

    async def post(self, payload: Payload) -> WriteResult:
        """Post a prepared body once and classify the outcome."""
        rid = str(uuid.uuid4())
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": payload.batch_id,
            "X-Request-ID": rid,
        }
        token = secret_value(self.config.token)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if payload.gzipped:
            headers["Content-Encoding"] = "gzip"
        self.last_request_id = rid
        try:
            response = await self._client.post(self.url, content=payload.content, headers=headers)
        except httpx.HTTPError as exc:
            self._count(_transport_label(exc))
            classify(None, exc)  # re-raises anything that is not a transport failure
            detail = str(exc) or type(exc).__name__
            if self.config.proxy:  # or the operator suspects the upstream, not the proxy
                detail += f" (via proxy {proxy_label(self.config.proxy)})"
            raise TransientError(f"{_transport_label(exc)}: {detail}", request_id=rid) from exc
        self._count(str(response.status_code))
        self.wire_bytes += len(payload.content)
        return self._answer(response, rid, len(payload.content))

    def _count(self, key: str) -> None:
        self.requests[key] = self.requests.get(key, 0) + 1

    def _answer(self, response: httpx.Response, rid: str, sent: int) -> WriteResult:
        status = response.status_code
        verdict = classify(status)
        if verdict.action is Action.DELIVERED:
            result = _parse_result(response, response.headers.get("x-request-id") or rid)
            result.wire_bytes = sent
            return result
        code, message, server_rid = _error_body(response)
        request_id = server_rid or response.headers.get("x-request-id") or rid
        text = f"HTTP {status}" + (f" {code}" if code else "") + f": {message}"
        if verdict.action is Action.REAUTHORIZE:
            raise ReauthorizationRequired(
                text, reason=verdict.reason or "unauthorized", request_id=request_id
            )
        if verdict.action is Action.SPLIT:
            raise BatchTooLarge(text, status=status, request_id=request_id)
        if verdict.action is Action.BISECT:
            raise BatchRejected(text, status=status, code=code, request_id=request_id)
        raise TransientError(
            text,
            status=status,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
            request_id=request_id,
        )
