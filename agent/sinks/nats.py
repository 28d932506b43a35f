"""The NATS JetStream sink, ``upstream.type = "nats"`` (docs/upstream.md, "NATS JetStream").

Every record is one JetStream message: subject from ``upstream.subject`` (a template such
as ``edge.{site}.{entity_type}``), payload the record's envelope JSON, header
``Nats-Msg-Id`` = the record id and ``Nats-Expected-Stream`` = ``upstream.stream``. A
record counts as delivered only once its PubAck came back; a PubAck with
``duplicate = true`` (the stream had that id within its ``duplicate_window``) is a
duplicate, acked too.

Per-entity order: a record of an entity is published only after the PubAck of the
entity's previous record in the batch, so two records of one entity are never in flight
at once; the ``max_in_flight`` window is filled with records of different entities.
Why not pipeline an entity's records too: if record 1 of an entity failed (a leader
election, a timeout) while record 2 got its PubAck, record 2 would be in the stream
BEFORE the resent record 1, and no later ack order can undo that: a consumer would apply
the older version last. Holding each entity to one in flight, a failure stops that
entity's later records for this attempt (left unnamed: the forwarder sends them again
after the backoff, still in order), while other entities go on.

The connection is opened on the first ``send`` and never reconnects by itself: a lost
connection fails that send (:class:`~agent.errors.TransientError`), and the next one
connects again, so reconnects go at the forwarder's backoff. Refused credentials raise
:class:`~agent.errors.ReauthorizationRequired`. All of it is sorted by ONE function,
:func:`classify`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import string
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import nats
import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from pydantic import Field, SecretStr, field_validator, model_validator

from agent.configtypes import (
    Duration,
    ExistingFile,
    PositiveDuration,
    SecretFilePath,
    format_duration,
    secret_value,
    warn,
)
from agent.errors import ReauthorizationRequired, TransientError
from agent.health import State
from agent.outbox import Leased
from agent.sinks.base import Rejection, SendResult, Sink, SinkPlugin, UpstreamConfig

log = structlog.get_logger("agent.sinks.nats")

PLACEHOLDERS = ("site", "entity_type", "source", "agent_id")
"""What a subject template may name: the record's site and source name (from its
envelope), its entity type, and the agent id."""

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_FORMATTER = string.Formatter()
_TOO_LARGE = 10054  # JetStream: "message size exceeds maximum allowed"
DEFAULT_DUPLICATE_WINDOW = 120.0  # JetStream's default, 2 minutes


def token_safe(value: str) -> str:
    """``value`` as ONE subject token: anything but letters, digits, ``_`` and ``-``
    (``.`` would split the token, ``*``/``>`` are wildcards, spaces end the subject)
    becomes ``_``; an empty value is ``_``."""
    return _UNSAFE.sub("_", value) or "_"


def template_fields(template: str) -> list[str]:
    """The placeholders ``template`` names; ValueError for a format it cannot be."""
    try:
        return [name for _, name, spec, conv in _FORMATTER.parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"invalid subject template {template!r}: {exc}") from None


class NatsConfig(UpstreamConfig):
    """``[upstream]`` with ``type = "nats"``: publish every record to a NATS JetStream
    stream, acked in the outbox once its PubAck came back."""

    type: Literal["nats"] = "nats"
    """``nats``: one JetStream message per record (``Nats-Msg-Id`` = record id)."""
    servers: list[str]
    """NATS server URLs (``nats://host:4222``, ``tls://host:4222``); several for a
    cluster, tried in order on each connect."""
    stream: str
    """The JetStream stream the records must land in (``Nats-Expected-Stream``)."""
    subject: str = "edge.{site}.{entity_type}"
    """Subject template; placeholders ``{site}``, ``{entity_type}``, ``{source}``,
    ``{agent_id}``. Each value is made one safe token (``.``, ``*``, ``>``, spaces and
    anything but letters, digits, ``_``, ``-`` become ``_``)."""
    create_stream: bool = False
    """Create the stream when it does not exist (with ``stream_subjects``, ``replicas``,
    ``duplicate_window``). Off: a missing stream is retried and shown in status."""
    stream_subjects: list[str] = Field(default_factory=list)
    """Subjects of a created stream. Default: the template with each placeholder's token
    as ``*`` (``edge.*.*``)."""
    replicas: int = 1
    """Replicas of a created stream (1, 3 or 5 on a cluster)."""
    duplicate_window: PositiveDuration = DEFAULT_DUPLICATE_WINDOW
    """Deduplication window of a created stream: a record id sent again within it is
    stored once. Past it JetStream stores a resent record again: the consumer must
    dedupe by id (docs/upstream.md)."""
    outage_horizon: Duration = 0.0
    """How long an upstream outage this site must ride out with no duplicate in the
    stream (0: not set). A ``duplicate_window`` shorter than this is warned about at
    load, at connect (the stream's actual window) and in status."""
    max_in_flight: int = 256
    """Publishes awaiting their PubAck at once (records of different entities; one
    entity has at most one in flight)."""
    ack_timeout: PositiveDuration = 10.0
    """How long to wait for a PubAck before the record is sent again (after backoff)."""
    connect_timeout: PositiveDuration = 5.0
    """Time allowed to connect to a server."""
    token: SecretStr | None = None
    """Authentication token. Prefer ``token_file``."""
    token_file: SecretFilePath | None = None
    """File holding the token (mode 600). Re-read on reload."""
    credentials_file: ExistingFile | None = None
    """A NATS ``.creds`` file (user JWT and nkey seed), for decentralized auth."""
    nkey_seed_file: ExistingFile | None = None
    """A file holding an nkey seed (``SU...``), for nkey auth."""
    tls_verify: bool = True
    """Verify the server's certificate (``tls://`` servers or a server that requires
    TLS). Only turn off for a lab."""
    ca_file: ExistingFile | None = None
    """Extra CA bundle (PEM) to trust (a private CA)."""
    client_cert_file: ExistingFile | None = None
    """Client certificate (PEM) for mutual TLS."""
    client_key_file: ExistingFile | None = None
    """Key of ``client_cert_file`` when it is not in the same file."""

    def target(self) -> str:
        """The stream and the first server (never a credential)."""
        return f"nats {self.stream} @ {_strip_userinfo(self.servers[0])}"

    @field_validator("servers")
    @classmethod
    def _check_servers(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one server (nats://host:4222)")
        for url in value:
            scheme = url.split("://", 1)[0] if "://" in url else ""
            if scheme not in ("nats", "tls") or not url.split("://", 1)[1]:
                raise ValueError(
                    f"invalid server {_strip_userinfo(url)!r} (write nats://host:4222)"
                )
        return value

    @field_validator("stream")
    @classmethod
    def _check_stream(cls, value: str) -> str:
        if not value or _UNSAFE.search(value):
            raise ValueError(f"invalid stream name {value!r} (letters, digits, _ and -)")
        return value

    @field_validator("subject")
    @classmethod
    def _check_subject(cls, value: str) -> str:
        names = template_fields(value)
        unknown = sorted(set(names) - set(PLACEHOLDERS))
        if unknown:
            raise ValueError(
                f"unknown placeholder {{{unknown[0]}}} in subject (one of: "
                + ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                + ")"
            )
        check_subject(value.format(**dict.fromkeys(PLACEHOLDERS, "x")), wildcards=False)
        return value

    @field_validator("stream_subjects")
    @classmethod
    def _check_stream_subjects(cls, value: list[str]) -> list[str]:
        for subject in value:
            check_subject(subject, wildcards=True)
        return value

    @field_validator("replicas")
    @classmethod
    def _check_replicas(cls, value: int) -> int:
        if not 1 <= value <= 5:
            raise ValueError("must be 1 to 5")
        return value

    @field_validator("max_in_flight")
    @classmethod
    def _check_window(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @model_validator(mode="after")
    def _check_auth(self) -> NatsConfig:
        given = [
            n
            for n in ("token", "credentials_file", "nkey_seed_file")
            if getattr(self, n) is not None
        ]
        if len(given) > 1:
            raise ValueError(
                f"set one of token/token_file, credentials_file, nkey_seed_file "
                f"(got {', '.join(given)})"
            )
        if not self.tls_verify:
            warn("upstream.tls_verify is off: the NATS server's identity is not checked")
        try:
            tls_context(self)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cannot load the TLS files (ca_file, client_cert_file): {exc}"
            ) from None
        return self

    @model_validator(mode="after")
    def _warn_window(self) -> NatsConfig:
        if self.create_stream and short_window(self.duplicate_window, self.outage_horizon):
            warn(window_warning(self.duplicate_window, self.outage_horizon))
        return self

    def subjects_of_stream(self) -> list[str]:
        """The subjects a created stream captures."""
        if self.stream_subjects:
            return list(self.stream_subjects)
        tokens = self.subject.split(".")
        return [".".join("*" if "{" in t else t for t in tokens)]


def check_subject(subject: str, *, wildcards: bool) -> None:
    """ValueError unless ``subject`` is a valid NATS subject (a stream's subjects may
    hold ``*`` and a last ``>``; a publish subject may not)."""
    tokens = subject.split(".")
    for i, tok in enumerate(tokens):
        if not tok or any(c.isspace() for c in tok):
            raise ValueError(f"invalid subject {subject!r} (empty token or white space)")
        wild = "*" in tok or ">" in tok
        if wild and (
            not wildcards or tok not in ("*", ">") or (tok == ">" and i < len(tokens) - 1)
        ):
            raise ValueError(f"invalid subject {subject!r} (wildcard {tok!r} here)")


def short_window(window: float, horizon: float) -> bool:
    """Whether a duplicate window of ``window`` s is shorter than the outage ``horizon``."""
    return horizon > 0 and window < horizon


def window_warning(window: float, horizon: float) -> str:
    """The words of the short-window warning."""
    return (
        f"upstream.duplicate_window ({format_duration(window)}) is shorter than "
        f"upstream.outage_horizon ({format_duration(horizon)}): a record resent after "
        "a longer outage is stored in the stream again; the consumer must dedupe by id"
    )


def _strip_userinfo(url: str) -> str:
    """A server URL without ``user:password@``."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}" if rest else url


def tls_context(config: NatsConfig) -> ssl.SSLContext | None:
    """TLS settings (verification on by default), or None for a plain ``nats://``
    server with no TLS files named."""
    wants = any(u.startswith("tls://") for u in config.servers) or any(
        f is not None for f in (config.ca_file, config.client_cert_file)
    )
    if not wants:
        return None
    ctx = ssl.create_default_context()
    if not config.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if config.ca_file is not None:
        ctx.load_verify_locations(cafile=config.ca_file)
    if config.client_cert_file is not None:
        ctx.load_cert_chain(config.client_cert_file, config.client_key_file)
    return ctx


# ---------------------------------------------------------------------- classification


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one publish's outcome means: ``ok`` (stored or duplicate), ``reject`` (this
    record can never be stored: dead letter) or ``retry`` (send again after backoff)."""

    action: Literal["ok", "reject", "retry", "reauthorize"]
    code: int | None = None
    message: str = ""


def classify(error: BaseException | None) -> Verdict:
    """THE retry classification of the NATS sink: a publish's error (None: a PubAck).

    Only a message over the stream's or server's size limit is refused for good (its
    record is dead-lettered with the reason). Refused credentials wait for new ones.
    Everything else - no stream for the subject (503 no responders), JetStream not
    ready or electing a leader, a full stream, an expected-stream mismatch, a timeout,
    a lost connection - is retried with backoff, since it passes or a reload fixes it.
    """
    if error is None:
        return Verdict("ok", 200)
    if isinstance(error, nats.errors.MaxPayloadError):
        return Verdict("reject", 413, f"larger than the server's max_payload: {error}")
    if isinstance(error, nats.js.errors.NoStreamResponseError):
        return Verdict("retry", 503, "no stream captures the subject (no responders)")
    if isinstance(error, nats.js.errors.APIError):
        text = error.description or type(error).__name__
        if error.err_code == _TOO_LARGE:
            return Verdict("reject", error.code or 400, text)
        return Verdict("retry", error.code or 500, f"{text} (err_code={error.err_code})")
    if (
        isinstance(error, nats.errors.AuthorizationError | nats.errors.InvalidUserCredentialsError)
        or "authorization violation" in str(error).lower()
    ):
        # nats-py reports a refused CONNECT as a plain Error with the server's words
        return Verdict("reauthorize", 401, "authorization violation")
    if isinstance(error, TimeoutError):
        return Verdict("retry", 408, str(error) or "timed out")
    return Verdict("retry", 503, f"{type(error).__name__}: {error}".rstrip(": "))


# ---------------------------------------------------------------------- the sink


@dataclass(eq=False)
class _Attempt:
    """One send: where PubAcks land and what they said."""

    queue: asyncio.Queue[tuple[int, BaseException | bool | None]] = field(
        default_factory=asyncio.Queue
    )
    accepted: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    failure: Verdict | None = None


_CLOSED = -1  # index of the queue entry close() puts in every attempt


class NatsSink(Sink):
    """Publishes records to JetStream over one NATS connection; see the module docstring."""

    type = "nats"
    config: NatsConfig

    def __init__(self, config: UpstreamConfig, agent_id: str) -> None:
        assert isinstance(config, NatsConfig)
        super().__init__(config, agent_id)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._inbox = ""
        self._tokens: dict[str, tuple[_Attempt, int]] = {}
        self._serial = 0
        self._attempts: set[_Attempt] = set()
        self._connecting = asyncio.Lock()
        self._closed = False
        self._lost: str | None = None
        self._last_error: BaseException | None = None
        self.stream_window: float | None = None
        """The stream's duplicate window (seconds) as the server reported it."""
        self.window_short = False
        self.publishes: dict[str, int] = {}
        """Publishes by outcome: ok, duplicate, and each failure's code."""
        self.connects = 0
        self.last_ok_at: float | None = None
        self.failing_since: float | None = None
        self.tracker.set(State.STARTING, "not connected yet")

    # ------------------------------------------------------------------ connection

    async def open(self) -> None:
        """Connect now if the server is there (a failure is retried by ``send``)."""
        with contextlib.suppress(TransientError, ReauthorizationRequired):
            await self._connection()

    def reconfigure(self, config: UpstreamConfig, agent_id: str) -> None:
        """A reload: new credentials or servers apply on the next connect, so the
        current connection is dropped when they changed."""
        assert isinstance(config, NatsConfig)
        if _connection_settings(config) != _connection_settings(self.config):
            self._drop("reconfigured")
        self.config = config
        self.agent_id = agent_id

    def _drop(self, why: str) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            task = asyncio.ensure_future(_close_quietly(nc))
            task.add_done_callback(lambda _: None)
        log.info("nats_connection_dropped", reason=why)

    async def _connection(self) -> JetStreamContext:
        """The JetStream context of a live connection; connects (once) when there is
        none. Raises TransientError / ReauthorizationRequired."""
        if self._closed:
            raise TransientError("sink closed", status=503, request_id=str(uuid.uuid4()))
        nc, js = self._nc, self._js
        if nc is not None and js is not None and nc.is_connected:
            return js
        async with self._connecting:
            if self._nc is not None and self._js is not None and self._nc.is_connected:
                return self._js
            if self._nc is not None:
                self._drop(self._lost or "connection lost")
            return await self._connect()

    async def _connect(self) -> JetStreamContext:
        cfg = self.config
        rid = str(uuid.uuid4())
        options: dict[str, Any] = {
            "servers": cfg.servers,
            "name": f"edge-agent {self.agent_id}",
            "connect_timeout": cfg.connect_timeout,
            "allow_reconnect": False,  # reconnects go at the forwarder's backoff
            "max_reconnect_attempts": 0,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnect,
            "closed_cb": self._on_disconnect,
        }
        tls = tls_context(cfg)
        if tls is not None:
            options["tls"] = tls
        token = secret_value(cfg.token)
        if token:
            options["token"] = token
        if cfg.credentials_file is not None:
            options["user_credentials"] = str(cfg.credentials_file)
        if cfg.nkey_seed_file is not None:
            options["nkeys_seed"] = str(cfg.nkey_seed_file)
        self.connects += 1
        self._lost = self._last_error = None
        nc = Client()
        try:
            await nc.connect(**options)
        except Exception as exc:
            await _close_quietly(nc)  # a refused CONNECT leaves the socket open
            verdict = classify(_root(exc))
            self._failing(verdict)
            if verdict.action == "reauthorize":
                raise ReauthorizationRequired(
                    f"NATS refused the credentials: {verdict.message}", request_id=rid
                ) from None
            raise TransientError(
                f"connect_error: {verdict.message}", status=verdict.code, request_id=rid
            ) from None
        inbox = f"{nc.new_inbox()}."
        try:
            await nc.subscribe(inbox + "*", cb=self._on_ack)
            js = nc.jetstream(timeout=cfg.ack_timeout)
            await self._ensure_stream(js, rid)
        except BaseException:
            await _close_quietly(nc)
            raise
        self._nc, self._js, self._inbox = nc, js, inbox
        log.info(
            "nats_connected",
            server=nc.connected_url.netloc.rpartition("@")[2] if nc.connected_url else None,
            stream=cfg.stream,
        )
        self.tracker.set(State.OK)
        return js

    async def _ensure_stream(self, js: JetStreamContext, rid: str) -> None:
        """The stream must exist, or be created when ``create_stream`` says so."""
        cfg = self.config
        try:
            info = await js.stream_info(cfg.stream)
        except nats.js.errors.NotFoundError:
            if not cfg.create_stream:
                self._failing(Verdict("retry", 404, f"stream {cfg.stream} does not exist"))
                raise TransientError(
                    f"stream {cfg.stream!r} does not exist (create it, or set "
                    "upstream.create_stream = true)",
                    status=404,
                    request_id=rid,
                ) from None
            info = await js.add_stream(
                StreamConfig(
                    name=cfg.stream,
                    subjects=cfg.subjects_of_stream(),
                    num_replicas=cfg.replicas,
                    duplicate_window=cfg.duplicate_window,
                )
            )
            log.info(
                "nats_stream_created",
                stream=cfg.stream,
                replicas=cfg.replicas,
                subjects=cfg.subjects_of_stream(),
            )
        except (nats.errors.Error, TimeoutError) as exc:
            verdict = classify(exc)
            self._failing(verdict)
            raise TransientError(
                f"stream_info: {verdict.message}", status=verdict.code, request_id=rid
            ) from None
        window = info.config.duplicate_window
        self.stream_window = float(window) if window is not None else DEFAULT_DUPLICATE_WINDOW
        self.window_short = short_window(self.stream_window, cfg.outage_horizon)
        if self.window_short:
            log.warning(
                "nats_duplicate_window_short",
                stream=cfg.stream,
                detail=window_warning(self.stream_window, cfg.outage_horizon),
            )

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        self._lost = classify(exc).message
        log.warning("nats_error", error=self._lost)

    async def _on_disconnect(self) -> None:
        # Every PubAck still awaited is lost with the connection: fail them now rather
        # than after ack_timeout.
        why = self._last_error or ConnectionError(self._lost or "disconnected")
        for attempt in list(self._attempts):
            attempt.queue.put_nowait((_CLOSED, why))
        if not self._closed and self.tracker.state is State.OK:
            self._failing(classify(why))

    async def _on_ack(self, msg: Msg) -> None:
        entry = self._tokens.pop(msg.subject[len(self._inbox) :], None)
        if entry is None:
            return  # an attempt that has ended (timed out, cancelled)
        attempt, index = entry
        outcome: BaseException | bool
        if msg.headers and msg.headers.get("Status") == "503":
            outcome = nats.js.errors.NoStreamResponseError()
        else:
            try:
                answer = orjson.loads(msg.data)
                error = answer.get("error")
                outcome = (
                    nats.js.errors.APIError.from_error(error)
                    if error
                    else bool(answer.get("duplicate", False))
                )
            except Exception as exc:  # an answer that is not a PubAck
                outcome = exc
        attempt.queue.put_nowait((index, outcome))

    def _failing(self, verdict: Verdict) -> None:
        if self.failing_since is None:
            self.failing_since = time.time()
        state = State.REAUTH if verdict.action == "reauthorize" else State.RETRYING
        self.tracker.set(state, verdict.message)

    def _succeeded(self) -> None:
        now = time.time()
        if self.failing_since is not None and self.stream_window is not None:
            outage = now - self.failing_since
            if outage > self.stream_window:
                log.warning(
                    "nats_replay_past_duplicate_window",
                    outage=round(outage, 1),
                    duplicate_window=self.stream_window,
                    detail="records in flight when the outage began may be in the stream "
                    "twice; the consumer must dedupe by id",
                )
        self.failing_since = None
        self.last_ok_at = now
        self.tracker.set(State.OK)

    # ------------------------------------------------------------------ sending

    async def send(self, batch: Sequence[Leased], *, batch_id: str) -> SendResult:
        """Publish ``batch``: each entity's records one after the other, up to
        ``max_in_flight`` entities at once; report each record's PubAck."""
        js = await self._connection()
        nc = self._nc
        assert nc is not None
        rid = f"{batch_id}:{uuid.uuid4().hex[:8]}"
        attempt = _Attempt()
        self._attempts.add(attempt)
        tokens: list[str] = []
        try:
            await self._publish_all(nc, batch, attempt, tokens)
        except nats.errors.Error as exc:  # the connection went while publishing
            attempt.failure = attempt.failure or classify(self._last_error or exc)
        finally:
            self._attempts.discard(attempt)
            for token in tokens:
                self._tokens.pop(token, None)
        del js
        return self._result(attempt, len(batch), rid)

    async def _publish_all(
        self, nc: Client, batch: Sequence[Leased], attempt: _Attempt, tokens: list[str]
    ) -> None:
        queues: dict[str, deque[int]] = {}
        for i, item in enumerate(batch):
            queues.setdefault(item.entity_id, deque()).append(i)
        ready = deque(queues)
        in_flight = 0
        window = self.config.max_in_flight
        limit = nc.max_payload
        while ready or in_flight:
            while ready and in_flight < window:
                entity = ready.popleft()
                index = queues[entity].popleft()
                item = batch[index]
                if len(item.body) > limit:  # refused for good: the entity goes on
                    self._settle(attempt, item, MaxPayloadError(len(item.body), limit))
                    if queues[entity]:
                        ready.append(entity)
                    continue
                self._serial += 1
                token = str(self._serial)
                self._tokens[token] = (attempt, index)
                tokens.append(token)
                await nc.publish(
                    self._subject(item),
                    item.body,
                    reply=self._inbox + token,
                    headers={"Nats-Msg-Id": item.id, "Nats-Expected-Stream": self.config.stream},
                )
                in_flight += 1
            if not in_flight:
                break
            try:
                async with asyncio.timeout(self.config.ack_timeout):
                    index, outcome = await attempt.queue.get()
            except TimeoutError:
                attempt.failure = attempt.failure or Verdict(
                    "retry", 408, f"no PubAck within {format_duration(self.config.ack_timeout)}"
                )
                return
            if index == _CLOSED:
                attempt.failure = classify(outcome if isinstance(outcome, BaseException) else None)
                if attempt.failure.action == "ok":
                    attempt.failure = Verdict("retry", 503, "connection closed")
                return
            in_flight -= 1
            item = batch[index]
            ok = self._settle(attempt, item, outcome)
            if ok and queues[item.entity_id]:
                ready.append(item.entity_id)

    def _settle(
        self, attempt: _Attempt, item: Leased, outcome: BaseException | bool | None
    ) -> bool:
        """Note one record's outcome; True when its entity may go on."""
        if not isinstance(outcome, BaseException):
            (attempt.duplicates if outcome else attempt.accepted).append(item.id)
            self._count("duplicate" if outcome else "ok")
            return True
        verdict = classify(outcome)
        self._count(str(verdict.code))
        if verdict.action == "reject":
            attempt.rejected.append(Rejection(item.id, "too_large", verdict.message))
            return True  # refused for good: its entity's next record may follow
        attempt.failure = attempt.failure or verdict
        return False

    def _result(self, attempt: _Attempt, size: int, rid: str) -> SendResult:
        named = len(attempt.accepted) + len(attempt.duplicates) + len(attempt.rejected)
        failure = attempt.failure
        if failure is not None and named == 0:
            self._failing(failure)
            if failure.action == "reauthorize":
                raise ReauthorizationRequired(failure.message, request_id=rid)
            raise TransientError(failure.message, status=failure.code, request_id=rid)
        if named:
            self._succeeded()
        if failure is not None:
            log.warning(
                "nats_publish_incomplete",
                failed=size - named,
                error=failure.message,
                request_id=rid,
            )
        return SendResult(
            accepted=attempt.accepted,
            duplicates=attempt.duplicates,
            rejected=attempt.rejected,
            status=failure.code or 503 if failure else 200,
            request_id=rid,
        )

    def _subject(self, item: Leased) -> str:
        template = self.config.subject
        names = template_fields(template)
        values: dict[str, str] = {}
        if "entity_type" in names:
            values["entity_type"] = token_safe(item.entity_type)
        if "agent_id" in names:
            values["agent_id"] = token_safe(self.agent_id)
        if "site" in names or "source" in names:
            source = orjson.loads(item.body).get("source") or {}
            values["site"] = token_safe(str(source.get("site") or ""))
            values["source"] = token_safe(str(source.get("name") or ""))
        return template.format(**values)

    def _count(self, key: str) -> None:
        self.publishes[key] = self.publishes.get(key, 0) + 1

    # ------------------------------------------------------------------ lifecycle, status

    async def close(self) -> None:
        """Close the connection; a send in flight ends with a TransientError."""
        self._closed = True
        for attempt in list(self._attempts):
            attempt.queue.put_nowait((_CLOSED, ConnectionError("sink closed")))
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            await _close_quietly(nc)
        self.tracker.set(State.STOPPED, "closed")

    def status(self) -> dict[str, Any]:
        """Servers, stream, its duplicate window and publishes by outcome."""
        return {
            "url": self.config.target(),
            "stream": self.config.stream,
            "duplicate_window": self.stream_window,
            "duplicate_window_short": self.window_short,
            "duplicate_window_warning": (
                window_warning(self.stream_window, self.config.outage_horizon)
                if self.window_short and self.stream_window is not None
                else None
            ),
            "requests": dict(self.publishes),
            "connects": self.connects,
        }


class MaxPayloadError(nats.errors.MaxPayloadError):
    """A record larger than the server's ``max_payload``."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__()
        self.text = f"{size} bytes, limit {limit}"

    def __str__(self) -> str:
        return self.text


def _root(exc: BaseException) -> BaseException:
    """nats-py wraps connect failures; the first non-generic cause says most."""
    seen = exc
    while isinstance(seen, nats.errors.NoServersError) and seen.__cause__ is not None:
        seen = seen.__cause__
    return seen


async def _close_quietly(nc: Client) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2.0):
            await nc.close()


def _connection_settings(config: NatsConfig) -> tuple[Any, ...]:
    return (
        tuple(config.servers),
        config.token,
        config.credentials_file,
        config.nkey_seed_file,
        config.tls_verify,
        config.ca_file,
        config.client_cert_file,
        config.client_key_file,
        config.connect_timeout,
    )


plugin = SinkPlugin("nats", NatsConfig, NatsSink)
