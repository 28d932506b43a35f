"""The upstream HTTPS sink, ``upstream.type = "http"`` (Upstream API v1, docs/upstream-api.md).

:class:`HttpSink` posts leased outbox records to ``{url}/v1/ingest`` and turns the
answer into a :class:`~agent.sinks.base.SendResult` or a typed error. Every answer, and
every failure to get one, is sorted by ONE function, :func:`classify`; the forwarder acts
on its verdict (ack, retry with backoff, wait for new credentials, split, bisect).
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import gzip
import ssl
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import orjson
from pydantic import SecretStr, field_validator, model_validator

from agent import __version__
from agent.configtypes import (
    ByteSize,
    ExistingFile,
    PositiveDuration,
    SecretFilePath,
    secret_value,
    warn,
)
from agent.errors import BatchRejected, BatchTooLarge, ReauthorizationRequired, TransientError
from agent.health import State
from agent.outbox import Leased
from agent.sinks.base import Rejection, SendResult, Sink, SinkPlugin, UpstreamConfig


class HttpConfig(UpstreamConfig):
    """``[upstream]`` with ``type = "http"`` (the default): the unified maintenance API."""

    type: Literal["http"] = "http"
    """``http``: POST batches to ``{url}/v1/ingest`` (the default)."""
    url: str
    """Base URL of the upstream; records are POSTed to ``{url}/v1/ingest``."""
    token: SecretStr | None = None
    """Bearer token. Prefer ``token_file``."""
    token_file: SecretFilePath | None = None
    """File holding the bearer token (mode 600). Re-read on reload (SIGHUP)."""
    tls_verify: bool = True
    """Verify the upstream's certificate. Only turn off for a lab, never in production."""
    ca_file: ExistingFile | None = None
    """Extra CA bundle (PEM) to trust, for a corporate TLS-inspecting proxy or private CA."""
    client_cert_file: ExistingFile | None = None
    """Client certificate (PEM) for mutual TLS."""
    client_key_file: ExistingFile | None = None
    """Key of ``client_cert_file`` when it is not in the same file."""
    proxy: str | None = None
    """HTTP(S) proxy URL, e.g. ``http://proxy.plant.local:3128``."""
    connect_timeout: PositiveDuration = 10.0
    """Time allowed to open a connection."""
    read_timeout: PositiveDuration = 60.0
    """Time allowed for the upstream's answer."""
    max_response_bytes: ByteSize = 4 << 20
    """Most bytes of one upstream answer the agent reads, both as sent (on the wire) and
    inflated (``Content-Encoding`` gzip or deflate, inflated step by step). A larger answer,
    error answers too, is a protocol error: counted (``requests.answer_too_large``), logged
    with the request id, retried with backoff; none of its records is acknowledged. A
    normal answer lists about 40 bytes per record (up to ~600 with a rejection message)."""
    gzip_min_bytes: ByteSize = 8 << 10
    """Compress request bodies at least this large."""

    def target(self) -> str:
        """The base URL."""
        return self.url

    @model_validator(mode="after")
    def _warn_unauthenticated(self) -> HttpConfig:
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
    def _check_tls_files(self) -> HttpConfig:
        # Load them now, so check-config and a reload refuse a bad file instead of the
        # forwarder failing on it later.
        try:
            ssl_context(self)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cannot load the TLS files (ca_file, client_cert_file): {exc}"
            ) from None
        return self

    @field_validator("max_response_bytes")
    @classmethod
    def _answer_room(cls, value: int) -> int:
        if value < _RESPONSE_MIN:
            raise ValueError(f"must be at least {_RESPONSE_MIN // 1024}KiB")
        return value

    @model_validator(mode="after")
    def _warn_small_answers(self) -> HttpConfig:
        worst = self.batch_max_records * _ANSWER_BYTES_PER_REJECTION
        if worst > self.max_response_bytes:
            warn(
                f"upstream.max_response_bytes ({self.max_response_bytes}) is below what an "
                f"answer rejecting all {self.batch_max_records} records of a batch may take "
                f"(~{worst}): raise it or lower batch_max_records"
            )
        return self

    @field_validator("proxy")
    @classmethod
    def _check_proxy(cls, value: str | None) -> str | None:
        if value is not None:
            url = httpx.URL(value)
            if url.scheme not in ("http", "https", "socks5", "socks5h") or not url.host:
                # Never echo it: a proxy URL may carry credentials.
                raise ValueError("invalid proxy URL (write http://host:port)")
        return value


RETRY_AFTER_MAX = 3600.0  # a Retry-After beyond an hour is taken as an hour
GZIP_LEVEL = 6
_THREAD_GZIP_BYTES = 256 << 10  # compress big bodies off the event loop
_ERROR_MESSAGE_MAX = 500
_ENDPOINT_PROBLEMS = frozenset({404, 405, 410})
_RESPONSE_MIN = 64 << 10
# An answer naming a record costs ~40 bytes; one rejecting it with a message up to ~600.
_ANSWER_BYTES_PER_REJECTION = 600
# What the agent can inflate with a bound (see _Inflater); httpx would also advertise br
# and zstd when their packages happen to be installed, and decode them without one.
ACCEPT_ENCODING = "gzip, deflate"


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
    misconfiguration that may be fixed by a reload: retried. So is an answer that breaks
    the protocol (over ``max_response_bytes``, not inflatable, not the JSON agreed on).
    """
    if status is None:
        if error is None or isinstance(
            error, httpx.TransportError | OSError | TimeoutError | TransientError
        ):
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


class AnswerTooLarge(TransientError):
    """The upstream's answer exceeds ``max_response_bytes`` (as sent or inflated).

    A protocol error: retried with backoff, nothing of the batch acknowledged.
    """


class _Inflater:
    """Inflates one ``Content-Encoding`` (gzip or deflate) chunk by chunk into ``out``,
    never past ``limit`` bytes: ``zlib``'s ``max_length`` stops a gzip bomb after
    ``limit + 1`` bytes of output, where httpx's decoders inflate a whole chunk at once
    (a 64 KiB chunk of a bomb is ~64 MiB)."""

    def __init__(self, coding: str, limit: int) -> None:
        self.coding = coding
        self.limit = limit
        self.first = True
        self._zlib = self._new()

    def _new(self, raw: bool = False) -> Any:
        if self.coding == "deflate":
            return zlib.decompressobj(-zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
        return zlib.decompressobj(zlib.MAX_WBITS | 16)

    def feed(self, data: bytes, out: bytearray) -> None:
        """Inflate ``data`` into ``out``; raise :class:`AnswerTooLarge` beyond the limit."""
        first, self.first = self.first, False
        try:
            self._feed(data, out)
        except zlib.error:
            if not (first and self.coding == "deflate"):
                raise
            # "deflate" is zlib-wrapped by the RFC, raw deflate by some servers (as httpx)
            self._zlib = self._new(raw=True)
            self._feed(data, out)

    def _feed(self, data: bytes, out: bytearray) -> None:
        while data:
            out += self._zlib.decompress(data, self.limit - len(out) + 1)
            if len(out) > self.limit:
                raise AnswerTooLarge(f"over {self.limit} bytes inflated")
            data = self._zlib.unconsumed_tail
            if not data and self._zlib.eof and self.coding == "gzip":
                data = self._zlib.unused_data  # a further gzip member (RFC 1952)
                if data:
                    self._zlib = self._new()

    def finish(self) -> None:
        """Raise :class:`zlib.error` when the compressed stream ended early."""
        if not self._zlib.eof:
            raise zlib.error("compressed answer ends before its end marker")


def _inflater(headers: httpx.Headers, limit: int) -> _Inflater | None:
    codings = [
        c.strip().lower()
        for c in headers.get("content-encoding", "").split(",")
        if c.strip().lower() not in ("", "identity")
    ]
    if not codings:
        return None
    if codings in (["gzip"], ["x-gzip"], ["deflate"]):
        return _Inflater("deflate" if codings == ["deflate"] else "gzip", limit)
    shown = ", ".join(codings)
    raise zlib.error(f"unsupported Content-Encoding {shown!r} (asked for {ACCEPT_ENCODING})")


async def read_answer(response: httpx.Response, limit: int) -> bytes:
    """The body of a streamed ``response``, at most ``limit`` bytes as sent and inflated.

    Raises :class:`AnswerTooLarge` beyond the limit (checked against ``Content-Length``
    first, then counted while reading) and :class:`zlib.error` for a body that cannot be
    inflated. Memory stays within about twice the limit whatever the upstream sends.
    """
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise AnswerTooLarge(f"Content-Length {declared} is over {limit} bytes")
    inflater = _inflater(response.headers, limit)
    body = bytearray()
    wire = 0
    async for chunk in response.aiter_raw():
        wire += len(chunk)
        if wire > limit:
            raise AnswerTooLarge(f"over {limit} bytes as sent")
        if inflater is None:
            body += chunk
        else:
            inflater.feed(chunk, body)
    if inflater is not None:
        inflater.finish()
    return bytes(body)


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


def ssl_context(config: HttpConfig) -> ssl.SSLContext | bool:
    """TLS settings: verification on by default, extra CA bundle, client certificate."""
    if not config.tls_verify:
        return False
    ctx = httpx.create_ssl_context()
    if config.ca_file is not None:
        ctx.load_verify_locations(cafile=config.ca_file)
    if config.client_cert_file is not None:
        ctx.load_cert_chain(config.client_cert_file, config.client_key_file)
    return ctx


def _transport_settings(config: HttpConfig) -> tuple[Any, ...]:
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


def _error_body(body: bytes, reason: str) -> tuple[str | None, str, str | None]:
    """``(code, message, request_id)`` from a ``{"error": {...}}`` body, if it is one."""
    try:
        err = orjson.loads(body)["error"]
        code, message, rid = err.get("code"), err.get("message"), err.get("request_id")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        text = body[: _ERROR_MESSAGE_MAX * 4].decode("utf-8", "replace")[:_ERROR_MESSAGE_MAX]
        return None, text.strip() or reason, None
    return (
        code if isinstance(code, str) else None,
        str(message or reason)[:_ERROR_MESSAGE_MAX],
        rid if isinstance(rid, str) else None,
    )


def _parse_result(body: bytes, status: int, request_id: str | None) -> SendResult:
    """A 200 answer; a malformed one is a transient error (the upstream is broken)."""
    try:
        answer = orjson.loads(body)
        result = SendResult(
            accepted=[str(i) for i in answer.get("accepted", [])],
            duplicates=[str(i) for i in answer.get("duplicates", [])],
            rejected=[
                Rejection(str(r["id"]), str(r.get("code", "rejected")), str(r.get("message", "")))
                for r in answer.get("rejected", [])
            ],
            status=status,
            request_id=request_id,
        )
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
        raise TransientError(
            f"invalid answer from upstream: {exc}", status=status, request_id=request_id
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


class HttpSink(Sink):
    """Posts batches to ``{url}/v1/ingest`` over one keep-alive :class:`httpx.AsyncClient`.

    ``send`` returns a :class:`SendResult` (HTTP 2xx) or raises :class:`TransientError`,
    :class:`ReauthorizationRequired`, :class:`BatchTooLarge` or :class:`BatchRejected`
    according to :func:`classify`. The token is read from the config on every attempt, so
    :meth:`reconfigure` with a new token takes effect on the very next request.
    """

    type = "http"
    config: HttpConfig

    def __init__(self, config: UpstreamConfig, agent_id: str) -> None:
        assert isinstance(config, HttpConfig)
        super().__init__(config, agent_id)
        self._client = self._build(config)
        self._retired: list[httpx.AsyncClient] = []
        self.requests: dict[str, int] = {}
        """Attempts by outcome: HTTP status code, or connect_error, timeout, ..."""
        self.wire_bytes = 0
        self.last_request_id: str | None = None
        # Stateless between requests: what the answers say is the forwarder's to track.
        self.tracker.set(State.OK)

    @staticmethod
    def _build(config: HttpConfig) -> httpx.AsyncClient:
        keep = max(1, config.concurrency)
        return httpx.AsyncClient(
            verify=ssl_context(config),
            proxy=config.proxy,
            timeout=httpx.Timeout(
                config.read_timeout, connect=config.connect_timeout, pool=config.read_timeout
            ),
            limits=httpx.Limits(max_connections=keep + 1, max_keepalive_connections=keep + 1),
            headers={
                "User-Agent": f"edge-agent/{__version__}",
                "X-API-Version": "1",
                "Accept-Encoding": ACCEPT_ENCODING,
            },
            follow_redirects=False,
        )

    def reconfigure(self, config: UpstreamConfig, agent_id: str) -> None:
        """Apply a reloaded config: a new token at once; TLS/proxy/timeouts via a new client."""
        assert isinstance(config, HttpConfig)
        if _transport_settings(config) != _transport_settings(self.config):
            # Requests in flight finish on the old client; it is closed with the sink.
            self._retired.append(self._client)
            self._client = self._build(config)
        self.config = config
        self.agent_id = agent_id

    async def close(self) -> None:
        """Close every connection."""
        for client in (*self._retired, self._client):
            await client.aclose()
        self._retired.clear()

    def status(self) -> dict[str, Any]:
        """The URL, attempts by outcome and bytes sent."""
        return {
            "url": self.config.url,
            "requests": dict(self.requests),
            "wire_bytes": self.wire_bytes,
        }

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

    async def send(self, batch: Sequence[Leased], *, batch_id: str) -> SendResult:
        """Send ``batch`` once. ``batch_id`` (the Idempotency-Key) is kept across retries."""
        payload = await self.prepare(batch, batch_id)
        return await self.post(payload)

    async def post(self, payload: Payload) -> SendResult:
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
            # Streamed, so the answer is read within max_response_bytes (read_answer);
            # leaving the block early closes the connection instead of reading the rest.
            async with self._client.stream(
                "POST", self.url, content=payload.content, headers=headers
            ) as response:
                self.wire_bytes += len(payload.content)
                body = await self._read(response, rid)
        except httpx.HTTPError as exc:
            self._count(_transport_label(exc))
            classify(None, exc)  # re-raises anything that is not a transport failure
            detail = str(exc) or type(exc).__name__
            if self.config.proxy:  # or the operator suspects the upstream, not the proxy
                detail += f" (via proxy {proxy_label(self.config.proxy)})"
            raise TransientError(f"{_transport_label(exc)}: {detail}", request_id=rid) from exc
        self._count(str(response.status_code))
        return self._answer(response, body, rid, len(payload.content))

    async def _read(self, response: httpx.Response, rid: str) -> bytes:
        """The answer's body, or a protocol error (too large, cannot be inflated)."""
        status = response.status_code
        request_id = response.headers.get("x-request-id") or rid
        try:
            return await read_answer(response, self.config.max_response_bytes)
        except AnswerTooLarge as exc:
            self._count("answer_too_large")
            raise AnswerTooLarge(
                f"answer too large (HTTP {status}): {exc}", status=status, request_id=request_id
            ) from None
        except zlib.error as exc:
            self._count("answer_undecodable")
            raise TransientError(
                f"invalid answer from upstream (HTTP {status}): {exc}",
                status=status,
                request_id=request_id,
            ) from None

    def _count(self, key: str) -> None:
        self.requests[key] = self.requests.get(key, 0) + 1

    def _answer(self, response: httpx.Response, body: bytes, rid: str, sent: int) -> SendResult:
        status = response.status_code
        verdict = classify(status)
        if verdict.action is Action.DELIVERED:
            result = _parse_result(body, status, response.headers.get("x-request-id") or rid)
            result.wire_bytes = sent
            return result
        code, message, server_rid = _error_body(body, response.reason_phrase)
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


plugin = SinkPlugin("http", HttpConfig, HttpSink)
