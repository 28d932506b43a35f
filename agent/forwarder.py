"""The forwarder: outbox → sink, in batches, with backoff, until every record is delivered.

Each worker (``upstream.concurrency`` of them) leases a batch, sends it, and settles every
record: accepted and duplicate records are acked (deleted), rejected ones dead-lettered
with their reason. A batch stays leased until it is settled; a failed attempt is retried
with the SAME records, never released and re-leased, because the outbox's lease is what
keeps per-entity order at any concurrency. The sink's verdicts drive what happens:

* transient (connect/read errors, 408, 429, 5xx): full-jitter backoff, ``Retry-After``
  honoured, forever;
* 401/403: state ``reauthorization_required``, a ``connection_status`` record is appended,
  probes every ``reauth_probe_interval``; a reload (new token) wakes the probe at once;
* 413: split the batch in halves; another 4xx: bisect down to the refused records;
  a 200 that leaves records out: send those again. Each of these waits the backoff
  before the next request too, and only a part settled whole resets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from agent.backoff import Backoff
from agent.errors import BatchRejected, BatchTooLarge, ReauthorizationRequired, TransientError
from agent.health import Component, Health, Kind, State, Tracker, worst
from agent.outbox import Leased, Outbox
from agent.records import SourceRef, connection_status
from agent.sinks.base import SendResult, Sink, UpstreamConfig, build_sink

if TYPE_CHECKING:
    from agent.config import Settings

log = structlog.get_logger("agent.forwarder")

IDLE_POLL = 1.0  # safety net beside the outbox's data event
DRAIN_POLL = 0.5

# The upstream's states (status ``upstream.state``; agent.health says what they mean).
OK = State.OK
RETRYING = State.RETRYING
REAUTH = State.REAUTH
STOPPED = State.STOPPED


@dataclass
class Part:
    """A slice of a leased batch, with the id it keeps across retries (Idempotency-Key)."""

    items: list[Leased]
    batch_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class Counters:
    """Delivery counters shown in status."""

    records_sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    splits: int = 0
    bisections: int = 0
    retries: int = 0


class Forwarder:
    """Delivers the outbox through the :class:`~agent.sinks.base.Sink` that
    ``upstream.type`` names; see the module docstring."""

    def __init__(
        self, outbox: Outbox, config: UpstreamConfig, agent_id: str, site: str | None = None
    ) -> None:
        self.outbox = outbox
        self.config = config
        self.agent_id = agent_id
        self.site = site
        self.sink: Sink | None = None
        self.tracker = Tracker(STOPPED)
        self.reason: str | None = None
        """Why credentials are needed (``unauthorized``, ``forbidden``) while in REAUTH."""
        self.last_push_at: float | None = None
        self.last_attempt_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_request_id: str | None = None
        self.next_attempt_at: float | None = None
        self.counters = Counters()
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._in_flight = 0
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    @property
    def state(self) -> State:
        """The delivery state: ok, retrying, reauthorization_required or stopped."""
        return self.tracker.state

    async def start(self) -> None:
        """Open the sink and start the workers (the outbox must be open)."""
        sink = self.sink = build_sink(self.config, self.agent_id)
        await sink.open()
        self.tracker.set(OK)
        n = max(1, self.config.concurrency)
        self._workers = [
            asyncio.create_task(self._worker(i), name=f"forwarder:{i}") for i in range(n)
        ]
        log.info("forwarder_started", sink=sink.type, url=sink.describe(), concurrency=n)

    async def drain(self, timeout: float, force: asyncio.Event | None = None) -> bool:
        """Keep delivering until the outbox is empty, ``timeout`` passes or ``force`` is set.

        Returns True when everything was delivered. Does not wait while the upstream
        refuses the credentials: nothing can be delivered then. A failing upstream is
        retried until the timeout, since it may come back within it.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = await self._undelivered()
            if left == 0:
                log.info("forwarder_drained")
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.state == REAUTH or (force is not None and force.is_set()):
                log.warning("forwarder_drain_incomplete", undelivered=left, state=self.state)
                return False
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, DRAIN_POLL)):
                    await self._progress.wait()

    async def _undelivered(self) -> int:
        stats = await self.outbox.stats()
        return sum(stats.rows.values())

    async def stop(self) -> None:
        """Stop the workers at once (leased records stay in the outbox) and close."""
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        for task in list(self._background):  # a status record blocked by a full outbox
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.sink is not None:
            await self.sink.close()  # kept for its counters in status
        self.tracker.set(STOPPED)

    def reconfigure(self, settings: Settings) -> None:
        """Reload hook: a new token (or TLS, proxy, URL) applies to the next attempt.

        Also wakes every worker sleeping in backoff or a reauthorization probe, so a new
        token is tried at once instead of after ``reauth_probe_interval``. A change of
        ``upstream.type`` needs a restart (the agent says so) and is not applied here.
        """
        if settings.upstream.type != self.config.type:
            return
        self.config = settings.upstream
        self.agent_id = settings.agent.id
        self.site = settings.agent.site
        if self.sink is not None:
            self.sink.reconfigure(settings.upstream, settings.agent.id)
        self._wake.set()

    # ------------------------------------------------------------------ workers

    async def _worker(self, index: int) -> None:
        backoff = Backoff(self.config.backoff_initial, self.config.backoff_cap)
        while True:
            backoff.initial, backoff.cap = self.config.backoff_initial, self.config.backoff_cap
            batch: list[Leased] = []
            try:
                batch = await self.outbox.lease(
                    self.config.batch_max_records, self.config.batch_max_bytes
                )
                if not batch:
                    self._progress.set()
                    await self.outbox.wait_for_data(IDLE_POLL)
                    continue
                self._in_flight += 1
                try:
                    await self._deliver(batch, backoff)
                finally:
                    self._in_flight -= 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A bug or a failing outbox must not end delivery. Give the unsettled
                # records back whole: each was the earliest of its entity still queued,
                # so leasing them again in seq order keeps per-entity order.
                log.exception("forwarder_failed", worker=index, error=str(exc))
                self._error(f"{type(exc).__name__}: {exc}")
                self.outbox.release(item.seq for item in batch)
                await self._sleep(backoff.delay())

    async def _deliver(self, batch: list[Leased], backoff: Backoff) -> None:
        """Settle every record of ``batch``; halves are sent left first (entity order).

        Every answer that does not settle a part whole (413, another 4xx, a 200 that
        leaves records out) is followed by a backoff delay before the next request, and
        only a part settled whole resets the backoff: an upstream that refuses
        everything gets requests at the backoff's pace, not as fast as it answers.
        """
        self.counters.batches += 1
        stack = [Part(batch)]
        while stack:
            part = stack.pop()
            try:
                result = await self._send(part, backoff)
            except BatchTooLarge as exc:
                self.counters.splits += 1
                stack += self._halves(part)
                if len(part.items) == 1:
                    await self._reject(part.items, "too large even alone: " + self._reason(exc))
                await self._refused("batch_split", part, exc, backoff)
            except BatchRejected as exc:
                self.counters.bisections += 1
                stack += self._halves(part)
                if len(part.items) == 1:
                    await self._reject(part.items, self._reason(exc))
                await self._refused("batch_bisected", part, exc, backoff)
            else:
                missing = await self._settle(part.items, result)
                if missing:
                    await self._incomplete(missing, result, backoff)
                    stack.append(Part(missing))
                else:
                    backoff.reset()
            self._progress.set()

    @staticmethod
    def _halves(part: Part) -> list[Part]:
        """The two halves, right first so the left one is popped (sent) first."""
        if len(part.items) == 1:
            return []
        mid = len(part.items) // 2
        return [Part(part.items[mid:]), Part(part.items[:mid])]

    async def _refused(
        self, event: str, part: Part, exc: BatchTooLarge | BatchRejected, backoff: Backoff
    ) -> None:
        """Log a 413/4xx answer, then wait the backoff before the next request."""
        self._error(str(exc))
        delay = backoff.delay()
        log.info(
            event,
            records=len(part.items),
            error=str(exc),
            request_id=exc.request_id,
            dead_lettered=len(part.items) == 1,
            retry_in=round(delay, 2),
        )
        await self._sleep(delay)

    async def _incomplete(
        self, missing: list[Leased], result: SendResult, backoff: Backoff
    ) -> None:
        """An answer that leaves records out: wait the backoff (at least the upstream's
        ``retry_after``), then they are sent again."""
        delay = backoff.delay(result.retry_after or 0.0)
        log.warning(
            "upstream_answer_incomplete",
            missing=len(missing),
            request_id=result.request_id,
            retry_in=round(delay, 2),
            detail="records neither accepted nor rejected are sent again",
        )
        await self._sleep(delay)

    @staticmethod
    def _reason(exc: BatchTooLarge | BatchRejected) -> str:
        return f"{exc} (request_id={exc.request_id})"

    async def _send(self, part: Part, backoff: Backoff) -> SendResult:
        """Send ``part`` until the upstream answers with a verdict on its records."""
        while True:
            sink = self.sink
            assert sink is not None, "forwarder not started"
            self.counters.records_sent += len(part.items)
            try:
                result = await sink.send(part.items, batch_id=part.batch_id)
            except TransientError as exc:
                self._note_request(exc.request_id)
                await self._transient(exc, backoff)
                continue
            except ReauthorizationRequired as exc:
                self._note_request(exc.request_id)
                await self._reauthorization(exc)
                continue
            except (BatchTooLarge, BatchRejected) as exc:
                self._note_request(exc.request_id)
                raise
            self._note_request(result.request_id)
            self._delivered()
            return result

    def _note_request(self, request_id: str | None) -> None:
        self.last_request_id = request_id
        self.last_attempt_at = time.time()

    def _delivered(self) -> None:
        self.last_push_at = time.time()
        if self.state == REAUTH:
            log.info("upstream_reauthorized")
            self._emit_status("connected", None, "credentials accepted again")
        if self.state != OK:
            log.info("upstream_recovered", previous=self.state.value)
        self.tracker.set(OK)
        self.reason = None
        self.next_attempt_at = None

    async def _transient(self, exc: TransientError, backoff: Backoff) -> None:
        self.counters.retries += 1
        self._error(str(exc))
        if self.state != REAUTH:
            self.tracker.set(RETRYING, str(exc))
        delay = backoff.delay(exc.retry_after or 0.0)
        log.warning(
            "upstream_retry",
            error=str(exc),
            status=exc.status,
            request_id=exc.request_id,
            retry_after=exc.retry_after,
            retry_in=round(delay, 2),
        )
        await self._sleep(delay)

    async def _reauthorization(self, exc: ReauthorizationRequired) -> None:
        self._error(str(exc))
        if self.state != REAUTH or self.reason != exc.reason:
            log.error(
                "upstream_reauthorization_required",
                reason=exc.reason,
                request_id=exc.request_id,
                error=str(exc),
                hint="set a valid upstream token and reload (systemctl reload edge-agent)",
            )
            self.reason = exc.reason
            self._emit_status(REAUTH.value, exc.reason, str(exc))
        self.tracker.set(REAUTH, str(exc))
        await self._sleep(self.config.reauth_probe_interval)

    def _emit_status(self, state: str, reason: str | None, detail: str) -> None:
        """Append a connection_status record, in the background (append may block)."""
        record = connection_status(
            SourceRef("upstream", "edge-agent", self.site), state, reason, detail
        )
        task = asyncio.create_task(self.outbox.append([record]))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _error(self, text: str) -> None:
        self.last_error = text
        self.last_error_at = time.time()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on a reload."""
        self.next_attempt_at = time.time() + seconds
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        self.next_attempt_at = None

    # ------------------------------------------------------------------ settling

    async def _settle(self, items: list[Leased], result: SendResult) -> list[Leased]:
        """Ack accepted and duplicates, dead-letter rejected; return unmentioned records."""
        seqs: dict[str, list[int]] = {}
        for item in items:
            seqs.setdefault(item.id, []).append(item.seq)
        done: set[str] = set()
        ack: list[int] = []
        counts = {"accepted": 0, "duplicates": 0}
        for kind, ids in (("accepted", result.accepted), ("duplicates", result.duplicates)):
            for rid in ids:
                if rid in seqs and rid not in done:
                    done.add(rid)
                    ack += seqs[rid]
                    counts[kind] += len(seqs[rid])
        reject: list[tuple[int, str]] = []
        for rej in result.rejected:
            if rej.id in seqs and rej.id not in done:
                done.add(rej.id)
                why = f"rejected {rej.code}: {rej.message} (request_id={result.request_id})"
                reject += [(seq, why) for seq in seqs[rej.id]]
        self.counters.accepted += counts["accepted"]
        self.counters.duplicates += counts["duplicates"]
        await self.outbox.ack(ack)
        if reject:
            await self._reject_pairs(reject)
        return [item for item in items if item.id not in done]

    async def _reject(self, items: Sequence[Leased], reason: str) -> None:
        await self._reject_pairs([(item.seq, reason) for item in items])

    async def _reject_pairs(self, pairs: list[tuple[int, str]]) -> None:
        self.counters.rejected += len(pairs)
        await self.outbox.reject(pairs)
        log.warning("records_dead_lettered", count=len(pairs), reason=pairs[0][1])

    # ------------------------------------------------------------------ status

    def health(self) -> Component:
        """The upstream as a component: the least ready of what the answers said (this
        forwarder's state) and what the sink says of its connection; the sink a part."""
        own = self.tracker.health
        if self.sink is None:
            return Component(Kind.UPSTREAM, "", own)
        sink = self.sink.health()
        merged: Health = worst([own, sink])
        return Component(Kind.UPSTREAM, "", merged, (Component(Kind.SINK, self.sink.type, sink),))

    def status(self) -> dict[str, Any]:
        """The upstream part of ``/v1/status`` (never a credential)."""
        sink = self.sink
        health = self.health()
        return {
            "type": self.config.type,
            "state": health.health.state.value,  # with the sink's: what readiness judges
            "reason": self.reason,
            "last_push_at": self.last_push_at,
            "last_attempt_at": self.last_attempt_at,
            "last_request_id": self.last_request_id,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "next_attempt_at": self.next_attempt_at,
            "in_flight": self._in_flight,
            "concurrency": len(self._workers),
            "requests": {},
            "wire_bytes": 0,
            **(sink.status() if sink is not None else {}),
            "records": {
                "sent": self.counters.records_sent,
                "accepted": self.counters.accepted,
                "duplicates": self.counters.duplicates,
                "rejected": self.counters.rejected,
            },
            "batches": self.counters.batches,
            "splits": self.counters.splits,
            "bisections": self.counters.bisections,
            "retries": self.counters.retries,
            "health": health.as_dict(),
        }
