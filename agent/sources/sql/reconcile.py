"""Content reconciliation of one SQL entity: every row re-read, compared, drifts sent.

The safety net under the change feeds: every ``reconcile_interval`` each row of the
entity is read again (keyset-paged in key order, one chunk per step, the steps spread
over the interval so the database sees a trickle), mapped as a sync maps it, and its
content hash compared with the version the upstream holds from this outbox (the key set,
:mod:`agent.outbox_keys`). What differs is sent and logged as a drift, naming the key
and the fields (:mod:`agent.sources.sql.keyset`), because it means a feed missed a change.
Keys the pass did not see, neither in the database nor appended by a feed while it ran,
were hard-deleted: they get ``op = "delete"`` records once the scan is through.

"The version the upstream holds" is the last one appended for the key, unless the
upstream refused it (dead letter): then nothing of it arrived, and the pass sends the
current content again. Versions still waiting in the outbox count as held: they are
delivered in order before anything appended later.

Progress (pass number, position, figures) is an outbox cursor committed with each step's
records and key marks, so a restart resumes the pass where it stopped. A step that fails
(a database error, an outbox commit that failed) leaves the in-memory progress ahead of
what committed: the next step first reloads it from the cursor, so the failed chunk is
read again instead of its keys being taken for hard deletes.

A pass without pauses (``sync --full``, tests, the benchmark) overlaps its work: the next
chunk is fetched while one is compared, the key set's rows of a chunk are read (on the
outbox's writer thread) while the chunk is mapped, and a chunk's commit runs while the
next one is read and mapped. Commits stay in order, and the delete phase starts only
after the last scan chunk committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from agent.outbox import Cursor, KeyMarks, Quarantined
from agent.outbox_keys import KeyRow, KeySet, digest_of
from agent.records import Op, Record, content_digests, entity_builder, format_time
from agent.sources.base import Output
from agent.sources.sql import keyset, mapping
from agent.sources.sql.model import (
    MOD,
    Row,
    decode_value,
    encode_value,
    key_label,
    scan_query,
    window_start,
)

if TYPE_CHECKING:
    from agent.sources.sql.sync import EntitySync

log = structlog.get_logger("agent.sources.sql")

SPREAD = 0.9
"""A scheduled pass aims to end within this share of ``reconcile_interval``."""
DRIFT_LOG_LIMIT = 1000
"""Drift warnings per entity and pass; the rest are counted in the pass summary."""
SEED_BATCH = 50_000
"""Keys per transaction when seeding the key set from an older agent's key list."""


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Cyclic GC paused for a loop over one chunk (no await inside): its ~20 objects per
    row are freed a chunk later, and collections in between find nothing (as in the
    sync's mapping, agent.sources.sql.sync)."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def _iso(at: float | None) -> str | None:
    return None if at is None else datetime.fromtimestamp(at, UTC).isoformat()


@dataclass
class Figures:
    """What one pass did (persisted with its progress)."""

    started_at: float | None = None
    finished_at: float | None = None
    full: bool = False
    rows: int = 0
    """Rows read and compared."""
    drifts: int = 0
    """Rows whose content differed from what the upstream holds (sent)."""
    created: int = 0
    """Rows no feed had sent (within ``initial_window``): sent, counted as drifts too."""
    resent: int = 0
    """Versions the upstream had refused (dead letters), sent again."""
    deletes: int = 0
    """Keys gone from the database: ``delete`` records sent."""
    baseline: int = 0
    """Rows the key set did not know yet (first pass, upgrade): recorded, not drifts."""
    out_of_window: int = 0
    """Rows never sent and last changed before ``initial_window``: left out, as the
    initial sync leaves them out."""
    quarantined: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view (times as RFC 3339)."""
        out = asdict(self)
        out["started_at"] = _iso(self.started_at)
        out["finished_at"] = _iso(self.finished_at)
        return out


@dataclass
class _Totals:
    rows: int = 0
    drifts: int = 0
    deletes: int = 0


@dataclass
class _Candidate:
    """A row that differs from what the upstream holds (or that it never got)."""

    kind: str
    rid: str
    had: KeyRow | None
    parts: tuple[Any, ...]
    """``(data, op, modified, custom, remote_data)`` as mapped."""
    digest: int


@dataclass
class _Chunk:
    """One scan chunk sorted into what the outbox has to learn."""

    records: list[Record] = field(default_factory=list)
    versions: list[tuple[str, bool, int | None, bytes | None]] = field(default_factory=list)
    resend: list[str] = field(default_factory=list)
    """Keys of ``records`` that re-send a version the upstream refused."""
    seen: list[str] = field(default_factory=list)
    bad: list[Quarantined] = field(default_factory=list)


class Reconciler:
    """The reconciliation passes of one entity (see the module docstring)."""

    def __init__(self, entity: EntitySync) -> None:
        self.entity = entity
        self.spec = entity.spec
        self.source = entity.source
        self.config = entity.config
        self.enabled = self.config.reconcile_interval is not None
        self.number = 0
        self.phase = "idle"  # idle | scan | deletes
        self.after: tuple[Any, ...] | None = None
        self.gone_after: str | None = None
        self.estimate = 0
        self.current = Figures()
        self.last: Figures | None = None
        self.totals = _Totals()
        self.layouts: dict[int, tuple[str, ...]] = {}
        self.layout: keyset.Layout | None = None
        self._shape: tuple[tuple[str, ...], tuple[str, ...], bool] | None = None
        self.retry_at: float | None = None
        self.since = time.time()
        """When this entity's key set began (the first pass is one interval later)."""
        self._last_step_at = 0.0
        self._logged = 0
        self._fields: Counter[str] = Counter()
        self._prefetch: tuple[tuple[Any, ...] | None, asyncio.Task[list[Row]]] | None = None
        self._commit: asyncio.Future[Any] | None = None
        """The last scan chunk's append, still committing (passes without pauses)."""
        self._reload = False
        """A step failed: progress in memory may be ahead of the committed cursor."""

    @property
    def cursor_key(self) -> str:
        """Outbox cursor key of this entity's reconciliation progress."""
        return f"reconcile:{self.spec.name}"

    def keys(self, out: Output) -> KeySet:
        """The entity's key set in the outbox."""
        return out.key_set(self.source.name, self.spec.name)

    # ------------------------------------------------------------------ state

    async def load(self, out: Output, legacy_last: float | None) -> None:
        """Restore progress; seed the key set from an older agent's key list once."""
        value = await out.cursor(self.source.name, self.cursor_key)
        if isinstance(value, dict):
            self._restore(value)
        elif self.enabled:
            await self._upgrade(out, legacy_last)
        if self.enabled:
            self.layouts = await self.keys(out).layouts()

    def _restore(self, value: dict[str, Any]) -> None:
        self.number = int(value.get("pass") or 0)
        self.phase = str(value.get("phase") or "idle")
        after = value.get("after")
        self.after = None if after is None else tuple(decode_value(v) for v in after)
        self.gone_after = value.get("gone_after")
        self.estimate = int(value.get("estimate") or 0)
        self.current = Figures(**(value.get("current") or {}))
        last = value.get("last")
        self.last = Figures(**last) if isinstance(last, dict) else None
        self.totals = _Totals(**(value.get("totals") or {}))
        self.since = float(value.get("since") or self.since)

    def _cursor(self) -> Cursor:
        value = {
            "pass": self.number,
            "phase": self.phase,
            "after": None if self.after is None else [encode_value(v) for v in self.after],
            "gone_after": self.gone_after,
            "estimate": self.estimate,
            "current": asdict(self.current),
            "last": None if self.last is None else asdict(self.last),
            "totals": asdict(self.totals),
            "since": self.since,
        }
        return Cursor(self.source.name, self.cursor_key, value)

    def _marks(self, **changes: Any) -> KeyMarks:
        layout = self.layout
        return KeyMarks(
            self.source.name,
            self.spec.name,
            None,
            entity_type=self.spec.entity_type.value,
            mark=self.number,
            layout=None if layout is None else (layout.tag, layout.names),
            **changes,
        )

    async def _upgrade(self, out: Output, legacy_last: float | None) -> None:
        """Older agents kept the keys seen by the last reconciliation in one compressed
        cursor (``keys:<entity>``); they become the key set, digests unknown."""
        blob = await out.cursor(self.source.name, f"keys:{self.spec.name}")
        if isinstance(blob, str) and blob:
            batch: list[str] = []
            for key in keyset.unpack(blob):
                batch.append(key)
                if len(batch) >= SEED_BATCH:
                    await out.append((), cursor=self._marks(seed=batch))
                    batch = []
            if batch:
                await out.append((), cursor=self._marks(seed=batch))
        if legacy_last is not None:
            self.last = Figures(started_at=legacy_last, finished_at=legacy_last)
        legacy = Cursor(self.source.name, f"keys:{self.spec.name}", None)
        await out.append((), cursor=[self._cursor(), legacy])

    def status(self) -> dict[str, Any]:
        """What /v1/status and /v1/sync-status show of reconciliation."""
        return {
            "enabled": self.enabled,
            "last_reconcile_at": _iso(self.last.finished_at if self.last else None),
            "pass": self.number,
            "state": "idle" if self.phase == "idle" else "in_progress",
            "current": None if self.phase == "idle" else self.current.as_dict(),
            "last": None if self.last is None else self.last.as_dict(),
            "totals": asdict(self.totals),
            "next_step_at": _iso(self.next_step_at()),
        }

    @property
    def last_reconcile_at(self) -> float | None:
        """When the last complete pass ended."""
        return None if self.last is None else self.last.finished_at

    # ------------------------------------------------------------------ schedule

    def next_step_at(self) -> float | None:
        """When the next scheduled step is due (None: reconciliation is off)."""
        every = self.config.reconcile_interval
        if every is None:
            return None
        if self.retry_at is not None:
            return self.retry_at
        if self.phase == "idle":
            # The first pass one interval after reconciliation began (with the first
            # sync, which read everything anyway).
            start = self.last.started_at if self.last else None
            return (self.since if start is None else start) + every
        started = self.current.started_at or time.time()
        remaining = max(1, math.ceil((self.estimate - self.current.rows) / self.config.chunk_size))
        if self.estimate <= self.config.chunk_size:
            return self._last_step_at  # one chunk: no spike to spread
        spacing = max(0.0, started + SPREAD * every - self._last_step_at) / (remaining + 1)
        return self._last_step_at + spacing

    def defer(self, delay: float) -> None:
        """After a failed step: retry in ``delay`` seconds."""
        self.retry_at = time.time() + delay

    # ------------------------------------------------------------------ passes

    async def run_pass(self, out: Output, *, fresh: bool = True, full: bool = False) -> int:
        """One whole pass without pauses (a new one, or the one in progress if not
        ``fresh``); returns the number of ``delete`` records it sent."""
        if self._reload:
            await self._reload_state(out)
        if fresh or self.phase == "idle":
            await self._begin(out, full=full)
        try:
            while not await self.step(out, prefetch=True):
                pass
        except BaseException:
            self._reload = True
            raise
        finally:
            self._drop_prefetch()
            if self._commit is not None:  # only after a failure: let it end, then reload
                with contextlib.suppress(Exception):
                    await self._flush()
                self._commit = None
        assert self.last is not None
        return self.last.deletes

    async def step(self, out: Output, *, prefetch: bool = False) -> bool:
        """One scheduled step: a scan chunk or a page of deletes. True when a pass ended."""
        if self._reload:
            await self._reload_state(out)
        self.retry_at = None
        self._last_step_at = time.time()
        try:
            if self.phase == "idle":
                await self._begin(out, full=False)
            if self.phase == "scan":
                await self._scan_step(out, prefetch)
                return False
            return await self._delete_step(out)
        except BaseException as exc:
            self._reload = True
            if isinstance(exc, asyncio.CancelledError):
                self._drop_prefetch()
            else:
                # Let the next chunk's query finish: one cancelled half-way leaks its
                # connection (as in the sync: agent.sources.sql.sync._run_feed).
                await self._settle_prefetch()
            raise

    async def _reload_state(self, out: Output) -> None:
        """Progress as last committed (after a failed step: what memory holds may be
        ahead of it, and a chunk not committed must not count as seen)."""
        self._drop_prefetch()
        value = await out.cursor(self.source.name, self.cursor_key)
        if isinstance(value, dict):
            self._restore(value)
        else:
            self.phase, self.after, self.gone_after = "idle", None, None
            self.current = Figures()
        self._reload = False

    async def _flush(self) -> None:
        """Wait for the previous chunk's commit (and raise its failure)."""
        pending, self._commit = self._commit, None
        if pending is not None:
            await pending

    async def _begin(self, out: Output, *, full: bool) -> None:
        self._drop_prefetch()
        total, _ = await self.keys(out).count()
        self.number += 1
        self.phase, self.after, self.gone_after = "scan", None, None
        self.estimate = total
        self.current = Figures(started_at=time.time(), full=full)
        self._logged = 0
        self._fields.clear()
        log.info(
            "sql_reconcile_started",
            source=self.source.name,
            entity=self.spec.name,
            pass_number=self.number,
            full=full,
            keys=total,
        )

    async def _fetch(self, after: tuple[Any, ...] | None) -> list[Row]:
        return await self.source.db.fetch(scan_query(self.spec, after, self.config.chunk_size))

    async def _rows(self, prefetch: bool) -> list[Row]:
        pending, self._prefetch = self._prefetch, None
        if pending is not None and pending[0] == self.after:
            rows = await pending[1]
        else:
            if pending is not None:
                pending[1].cancel()
            rows = await self._fetch(self.after)
        if prefetch and len(rows) == self.config.chunk_size:
            nxt = self._position(rows[-1])
            self._prefetch = (nxt, asyncio.create_task(self._fetch(nxt)))
        return rows

    async def _settle_prefetch(self) -> None:
        pending, self._prefetch = self._prefetch, None
        if pending is not None:
            await asyncio.gather(pending[1], return_exceptions=True)

    def _drop_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch[1].cancel()
            self._prefetch = None

    def _position(self, row: Row) -> tuple[Any, ...]:
        return tuple(row[key_label(i)] for i in range(len(self.spec.key_columns)))

    async def _scan_step(self, out: Output, prefetch: bool) -> None:
        rows = await self._rows(prefetch)
        chunk = await self._sort(out, rows) if rows else _Chunk()
        if rows:
            self.after = self._position(rows[-1])
        if len(rows) < self.config.chunk_size:
            self.phase = "deletes"
        fig, n = self.current, len(rows)
        fig.rows += n
        self.totals.rows += n
        # ``sent``: each version here is stored (the resent ones released from dedupe) or
        # equals what the upstream holds, so a dead-letter flag clears even where the
        # digest stays the same.
        marks = self._marks(
            versions=chunk.versions, seen=chunk.seen, resend=chunk.resend, sent=True
        )
        await self._flush()  # commits in order; a failed one fails this step
        append = out.append(chunk.records, cursor=[self._cursor(), marks], quarantine=chunk.bad)
        if prefetch:  # a pass without pauses: the commit runs while the next chunk is read
            self._commit = asyncio.ensure_future(append)
        else:
            await append

    async def _delete_step(self, out: Output) -> bool:
        await self._flush()  # every scan chunk's marks committed before keys count as gone
        stale = await self.keys(out).stale(self.number, self.gone_after, self.config.chunk_size)
        now = datetime.now(UTC)
        records = [
            Record.entity(
                self.source.ref,
                self.spec.entity_type,
                key,
                {"deleted": True, "reason": "not_found_in_source"},
                op=Op.DELETE,
                source_modified_at=now,
                modified_precision=self.spec.precision,
            )
            for key, live in stale
            if live  # a key already deleted upstream (flag) that vanished: nothing to send
        ]
        done = len(stale) < self.config.chunk_size
        if stale:
            self.gone_after = stale[-1][0]
        self.current.deletes += len(records)
        self.totals.deletes += len(records)
        if done:
            self._finish()
        marks = self._marks(forget=[k for k, _ in stale])
        await out.append(records, cursor=[self._cursor(), marks])
        if done:
            await self._finished(out)
        return done

    def _finish(self) -> None:
        self.phase = "idle"
        self.current.finished_at = time.time()
        self.last, self.current = self.current, Figures()
        self.after = self.gone_after = None

    async def _finished(self, out: Output) -> None:
        fig = self.last
        assert fig is not None
        keys, live = await self.keys(out).count()
        st = self.entity.state
        st.last_reconcile_at = fig.finished_at
        st.reconcile_deletes += fig.deletes
        st.known_keys = live
        suppressed = max(0, fig.drifts - DRIFT_LOG_LIMIT) if not fig.full else fig.drifts
        log.info(
            "sql_reconciled",
            source=self.source.name,
            entity=self.spec.name,
            pass_number=self.number,
            full=fig.full,
            rows=fig.rows,
            drifts=fig.drifts,
            created=fig.created,
            resent=fig.resent,
            deletes=fig.deletes,
            baseline=fig.baseline,
            out_of_window=fig.out_of_window,
            keys=keys,
            drift_fields=dict(self._fields.most_common(20)),
            drifts_not_logged=suppressed,
            seconds=round((fig.finished_at or 0) - (fig.started_at or 0), 3),
        )

    # ------------------------------------------------------------------ one chunk

    async def _sort(self, out: Output, rows: Sequence[Row]) -> _Chunk:
        """Map a chunk and compare it with the key set: what to send, what to mark."""
        spec = self.spec
        ctx = await spec.enrich(rows) if spec.enrich is not None else None
        with _no_gc():
            mapped = self._map(rows, ctx)
            good = [(rid, parts) for rid, _, parts, _ in mapped if parts is not None]
            digests = content_digests([parts for _, parts in good])
        # The outbox compares: only keys not held as exactly this version come back.
        versions = {str(rid): d for (rid, _), d in zip(good, digests, strict=True)}
        if len(versions) == len(good):
            differ = await self.keys(out).differing(versions)
        else:  # two rows of the chunk gave one remote_id (a mapper's choice): each compared
            held = await self.keys(out).lookup(list(versions))
            differ = {str(rid): held.get(str(rid)) for rid, _ in good}
        chunk = _Chunk()
        with _no_gc():
            candidates = self._compare(chunk, mapped, digests, differ)
        if candidates and not self.current.full:
            candidates = await self._settle(out, candidates)
        self._take(chunk, candidates)
        return chunk

    def _compare(
        self,
        chunk: _Chunk,
        mapped: list[tuple[str | None, Row, tuple[Any, ...] | None, Exception | None]],
        digests: list[int],
        differ: dict[str, KeyRow | None],
    ) -> list[_Candidate]:
        """Sort mapped rows (``digests``: of those that mapped, in order; ``differ``: the
        keys not held as exactly that version) into ``chunk`` (seen, versions to fill
        in, quarantined); returns those that differ."""
        entity = self.entity
        floor = self._window_floor()
        candidates: list[_Candidate] = []
        next_digest = iter(digests).__next__
        for rid, row, parts, error in mapped:
            if parts is None:
                assert error is not None
                chunk.bad.append(entity.quarantine(row, error))
                self.current.quarantined += 1
                if rid is not None:
                    chunk.seen.append(rid)  # it exists: not a hard delete
                continue
            assert rid is not None
            digest = next_digest()
            if rid not in differ:  # the usual case: held, delivered, fields known
                chunk.seen.append(rid)
                continue
            op = parts[1]
            had = differ[rid]
            kind = self._classify(had, digest, row, floor)
            if kind == "seen":
                if had is not None and had.fields is None:  # fill in, for later drifts
                    chunk.versions.append((rid, op is Op.UPSERT, digest, self._digests(parts)))
                else:
                    chunk.seen.append(rid)
            elif kind == "skip":
                self.current.out_of_window += 1
            else:
                candidates.append(_Candidate(kind, rid, had, parts, digest))
        return candidates

    async def _settle(self, out: Output, candidates: list[_Candidate]) -> list[_Candidate]:
        """Drop candidates a feed delivers by itself in its next pass.

        A row changed since the last incremental pass differs from what the upstream
        holds although a feed will send it: no drift. So the feeds run first (their
        pass would be due soon anyway), and what they appended meanwhile wins: it was
        read later than this chunk. What no feed touched is a drift.
        """
        await self._flush()  # the feeds' appends come after the scan's, as they were read
        await self.entity.run_pass(out)
        now = await self.keys(out).lookup([c.rid for c in candidates])
        return [c for c in candidates if now.get(c.rid) == c.had]

    def _take(self, chunk: _Chunk, candidates: list[_Candidate]) -> None:
        build = entity_builder(self.source.ref, self.spec.entity_type, self.spec.precision).build
        observed = format_time(datetime.now(UTC))
        for c in candidates:
            data, op, mod, custom, remote = c.parts
            modified = None if mod is None else format_time(mod)
            record = build(c.rid, data, op, custom, remote, modified, observed)
            version = (c.rid, op is Op.UPSERT, c.digest, self._digests(c.parts))
            chunk.records.append(record)
            chunk.versions.append(version)
            if c.kind == "resend":
                chunk.resend.append(c.rid)
            self._count(c.kind, c.rid, c.had, version, op)

    def _map(
        self, rows: Sequence[Row], ctx: Any
    ) -> list[tuple[str | None, Row, tuple[Any, ...] | None, Exception | None]]:
        """``(remote_id, row, (data, op, modified, custom, remote_data), error)`` per row."""
        spec, fmap = self.spec, self.entity.mapping
        if rows:  # a mapped column missing from the result: fail, as a sync does
            mapping.check_columns(self.source.name, spec.name, self.entity.columns, rows[0])
        leave_out = mapping.remote_columns(fmap, rows[0]) if rows else None
        out: list[tuple[str | None, Row, tuple[Any, ...] | None, Exception | None]] = []
        mapper, plain = spec.mapper, fmap is None  # no field mappings: inline mapping.apply
        for row in rows:
            try:
                rid, data, op, mod = mapper(row, ctx)
                if plain:
                    custom: dict[str, Any] = {}
                    remote = None
                    if leave_out is not None:
                        remote = row.copy()
                        for key in leave_out:
                            del remote[key]
                else:
                    data, custom, remote = mapping.apply(fmap, data, row, leave_out)
                out.append((rid, row, (data, op, mod, custom, remote), None))
            except Exception as exc:  # quarantined; the key still counts as present
                out.append((self._rid_of(row), row, None, exc))
        return out

    def _rid_of(self, row: Row) -> str | None:
        try:
            return self.spec.remote_id(self._position(row))
        except Exception:  # a key the mapper could not read either: only quarantined
            return None

    def _classify(self, had: KeyRow | None, digest: int, row: Row, floor: Any) -> str:
        """``seen`` (as held), ``drift``, ``resend``, ``created``, ``baseline``, ``skip``."""
        if had is None:
            if not self._in_window(row, floor):
                return "skip"
            # An empty key set on the first pass: it starts with this pass (reconciliation
            # just turned on). Otherwise a row no feed sent: a create the feeds missed.
            return "baseline" if self.estimate == 0 and self.number <= 1 else "created"
        if had.digest is None:
            return "baseline"  # seeded at an upgrade: content not known
        if had.digest != digest:
            return "drift"
        return "resend" if had.undelivered else "seen"

    def _window_floor(self) -> Any:
        feed = self.spec.feeds[0]
        return window_start(feed.kind, self.config.initial_window, self.entity.tz, aware=False)

    def _in_window(self, row: Row, floor: Any) -> bool:
        """Is a row no feed sent within the scope of the initial sync (changed within
        ``initial_window``)? Rows older than that were left out on purpose."""
        if floor is None:
            return True
        mod = row.get(MOD)
        if mod is None:
            return False
        try:
            if getattr(mod, "tzinfo", None) is not None and getattr(floor, "tzinfo", 0) is None:
                mod = mod.astimezone(self.entity.tz).replace(tzinfo=None)
            return bool(mod >= floor)
        except TypeError:  # a cursor of another type than its kind says: keep the row
            return True

    def _digests(self, parts: tuple[Any, ...]) -> bytes:
        data, _, _, custom, remote = parts
        return self.digests(data, custom, remote)

    def digests(
        self, data: dict[str, Any], custom: dict[str, Any], remote: dict[str, Any] | None
    ) -> bytes:
        """The field digest blob of a version (see :mod:`agent.sources.sql.keyset`)."""
        shape = (tuple(data), tuple(custom), remote is not None)
        if shape != self._shape:  # a new layout (first row, mapping change)
            self.layout = keyset.layout_of(data, custom, remote)
            self.layouts[self.layout.tag] = self.layout.names
            self._shape = shape
        assert self.layout is not None
        return keyset.field_digests(self.layout, data, custom, remote)

    def feed_marks(self, records: Sequence[Record], *, fields: bool) -> KeyMarks:
        """What a feed chunk's append tells the key set (with field digests if ``fields``)."""
        versions = [
            (
                r.remote_id,
                r.op is Op.UPSERT,
                digest_of(r.content_hash),
                self.digests(r.data, r.custom, r.remote_data) if fields else None,
            )
            for r in records
        ]
        return self._marks(versions=versions)

    def _count(
        self,
        kind: str,
        rid: str,
        had: KeyRow | None,
        version: tuple[str, bool, int | None, bytes | None],
        op: Op,
    ) -> None:
        fig = self.current
        if kind == "baseline":
            fig.baseline += 1
            return
        fields: list[str] | None = []
        if kind == "resend":
            fig.resent += 1
            reason = "dead_lettered"
        elif had is None:
            fig.drifts += 1
            fig.created += 1
            self.totals.drifts += 1
            reason = "created"
            self._fields.update(["(created)"])
        else:
            fig.drifts += 1
            self.totals.drifts += 1
            reason = "changed"
            fields = keyset.changed_fields(had.fields, version[3] or b"", self.layouts)
            if had.live != (op is Op.UPSERT):
                fields = ["op", *(fields or [])]
            self._fields.update(fields or ["unknown"])
        if fig.full or self._logged >= DRIFT_LOG_LIMIT:
            return
        self._logged += 1
        log.warning(
            "sql_reconcile_drift",
            source=self.source.name,
            entity=self.spec.name,
            key=rid,
            reason=reason,
            op=op.value,
            fields=fields if fields is not None else "unknown",
            hint="a change no feed saw; sent now",
        )
