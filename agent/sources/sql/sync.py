"""Incremental sync of one entity: chunks, compound watermarks.

Every chunk is mapped to records and committed with ONE ``out.append`` that also carries
the entity's new watermark (cursor ``watermark:<entity>``), so a crash can neither lose
rows (the watermark never runs ahead of the records) nor skip any on restart (the
watermark never lags behind what was committed, and re-sent rows carry equal ids).
With reconciliation on, the same append tells the entity's key set what was sent
(:mod:`agent.sources.sql.reconcile`).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import orjson
import structlog

from agent import tasks
from agent.outbox import Cursor, Quarantined
from agent.records import Op, Record, entity_builder, format_time, iso_utc
from agent.sources.base import Output
from agent.sources.sql import mapping
from agent.sources.sql.model import (
    MOD,
    EntitySpec,
    Feed,
    Row,
    Watermark,
    chunk_query,
    key_label,
    shift_back,
    window_start,
)
from agent.sources.sql.reconcile import Reconciler

if TYPE_CHECKING:
    from agent.sources.sql.source import SqlSource

log = structlog.get_logger("agent.sources.sql")


def rfc3339(at: datetime) -> str:
    """Same text as :func:`agent.records.format_time` (UTC, milliseconds, ``Z``), faster."""
    if at.tzinfo is not UTC:
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return iso_utc(at)


async def _let_run(turns: int = 2) -> None:
    """Give the loop a few turns before a chunk's mapping holds it (~50 ms of CPU).

    Tasks just created (the next chunk's query, the previous chunk's append) only start
    at the next turn, and the outbox writer wakes up at the one after: without these
    turns the query would be sent, and the commit begun, only after the mapping, and the
    pipeline would run one step at a time. Performance only: order and durability do
    not depend on it.
    """
    for _ in range(turns):
        await asyncio.sleep(0)


def _iso(at: float | None) -> str | None:
    return None if at is None else datetime.fromtimestamp(at, UTC).isoformat()


@dataclass
class SyncState:
    """What /v1/sync-status shows for one entity."""

    status: str = "idle"
    """``idle`` (never ran since start), ``in_progress``, ``completed``, ``failed``."""
    last_successful_sync_at: float | None = None
    last_started_at: float | None = None
    next_scheduled_at: float | None = None
    full: bool = False
    rows: int = 0
    stored: int = 0
    unchanged: int = 0
    quarantined: int = 0
    deletes: int = 0
    error: str | None = None
    last_reconcile_at: float | None = None
    reconcile_deletes: int = 0
    known_keys: int | None = None
    rows_without_key: int | None = None
    """Rows the feeds leave out because a key column is NULL (last count; None: not
    counted, the profile's keys cannot be NULL)."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view (times as RFC 3339)."""
        return {
            "status": self.status,
            "last_successful_sync_at": _iso(self.last_successful_sync_at),
            "last_started_at": _iso(self.last_started_at),
            "next_scheduled_at": _iso(self.next_scheduled_at),
            "full": self.full,
            "rows_without_key": self.rows_without_key,
            "progress": {
                "rows": self.rows,
                "stored": self.stored,
                "unchanged": self.unchanged,
                "quarantined": self.quarantined,
                "deletes": self.deletes,
            },
            "error": self.error,
            "last_reconcile_at": _iso(self.last_reconcile_at),
            "reconcile_deletes": self.reconcile_deletes,
            "known_keys": self.known_keys,
        }


_WIDTH_SAMPLES = 64
UNKEYED_EVERY = 3600.0  # seconds between counts of rows left out for a NULL key
_VALUE_BYTES = 16  # what a number, date or NULL costs beside text and binary values


def widest_row(rows: Sequence[Row]) -> int:
    """Bytes of the widest of (a sample of about 64 of) ``rows``: text and binary values
    by their length, any other value as 16. Sampled, so a 5,000-row chunk costs ~0.1 ms."""
    step = max(1, len(rows) // _WIDTH_SAMPLES)
    sample = [*rows[::step], rows[-1]]
    return max(
        sum(
            len(v) if isinstance(v, str | bytes | bytearray | memoryview) else _VALUE_BYTES
            for v in row.values()
        )
        for row in sample
    )


class EntitySync:
    """Sync state and passes of one entity of one SQL source."""

    def __init__(self, source: SqlSource, spec: EntitySpec) -> None:
        self.source = source
        self.spec = spec
        self.config = source.config
        self.mapping = source.config.mappings.get(spec.name)
        self.tz = ZoneInfo(source.config.timezone)
        self.marks: dict[str, Watermark | None] = {f.name: None for f in spec.feeds}
        self._widths: dict[str, int] = {}  # feed: bytes of its widest row in the last chunk
        self.state = SyncState()
        self._unkeyed_due = 0.0  # monotonic time of the next NULL-key count
        self.reconciler = Reconciler(self)
        self.columns = mapping.mapped_columns(
            spec.name, spec.extra.get("columns", {}), self.mapping
        )

    @property
    def cursor_key(self) -> str:
        """Outbox cursor key of this entity's watermark."""
        return f"watermark:{self.spec.name}"

    async def load(self, out: Output) -> None:
        """Restore watermarks, sync times and reconciliation progress after a restart."""
        value = await out.cursor(self.source.name, self.cursor_key)
        legacy_reconcile_at = None
        if isinstance(value, dict):
            for name, mark in (value.get("feeds") or {}).items():
                if name in self.marks:
                    self.marks[name] = Watermark.decode(mark)
            self.state.last_successful_sync_at = value.get("last_successful_sync_at")
            legacy_reconcile_at = value.get("last_reconcile_at")
        await self.reconciler.load(out, legacy_reconcile_at)
        self.state.last_reconcile_at = self.reconciler.last_reconcile_at

    def status(self) -> dict[str, Any]:
        """/v1/sync-status of this entity: the sync's state and reconciliation's."""
        return {**self.state.as_dict(), "reconcile": self.reconciler.status()}

    def _cursor(self, feed: str | None = None, mark: Watermark | None = None) -> Cursor:
        marks = dict(self.marks)
        if feed is not None:
            marks[feed] = mark
        value = {
            "feeds": {n: (m.encode() if m is not None else None) for n, m in marks.items()},
            "last_successful_sync_at": self.state.last_successful_sync_at,
            "last_reconcile_at": self.state.last_reconcile_at,
        }
        return Cursor(self.source.name, self.cursor_key, value)

    # ------------------------------------------------------------------ passes

    async def run_pass(self, out: Output, *, full: bool = False) -> None:
        """Read every feed from its watermark to the end.

        ``full``: afterwards compare every row with what the upstream holds and send what
        differs, hard deletes included (a reconciliation pass without pauses), so the
        upstream's latest version of every entity equals the source when it returns.
        Without reconciliation (``reconcile_interval`` unset) no key set is kept: the
        feeds are re-read from the start instead, and hard deletes are not found.
        """
        st = self.state
        st.status, st.full, st.error = "in_progress", full, None
        st.last_started_at = time.time()
        st.rows = st.stored = st.unchanged = st.quarantined = st.deletes = 0
        log.info("sql_sync_started", source=self.source.name, entity=self.spec.name, full=full)
        reconcile = full and self.reconciler.enabled
        try:
            for feed in self.spec.feeds:
                await self._run_feed(out, feed, full and not reconcile)
            if reconcile:
                await self.reconciler.run_pass(out, fresh=True, full=True)
            await self._count_unkeyed(full)
            st.last_successful_sync_at = time.time()
            await out.append((), cursor=self._cursor())
        except BaseException as exc:
            st.status = "failed"
            st.error = f"{type(exc).__name__}: {exc}"
            raise
        st.status = "completed"
        log.info(
            "sql_sync_completed",
            source=self.source.name,
            entity=self.spec.name,
            rows=st.rows,
            stored=st.stored,
            unchanged=st.unchanged,
            quarantined=st.quarantined,
        )

    async def _count_unkeyed(self, full: bool) -> None:
        """Count the rows left out for a NULL key: at the first pass after a start, at a
        full sync, and at most hourly otherwise (a count over a view can be a scan)."""
        query, st = self.spec.unkeyed, self.state
        now = time.monotonic()
        if query is None or not (full or now >= self._unkeyed_due):
            return
        self._unkeyed_due = now + UNKEYED_EVERY
        rows = await self.source.db.fetch(query)
        st.rows_without_key = int(next(iter(rows[0].values()))) if rows else 0
        if st.rows_without_key:
            log.warning(
                "sql_rows_without_key",
                source=self.source.name,
                entity=self.spec.name,
                rows=st.rows_without_key,
                detail="rows whose key column is NULL have no identity and are not read; "
                "give them a key or filter them out in the entity's query",
            )

    def _start(self, feed: Feed, full: bool) -> Watermark:
        mark = self.marks.get(feed.name)
        if (full and not feed.trigger) or feed.snapshot:
            return Watermark(None, None)
        if mark is None or mark.mod is None:
            floor = window_start(feed.kind, self.config.initial_window, self.tz, aware=False)
            return Watermark(floor, None)
        if feed.overlap > 0:
            return Watermark(shift_back(feed.kind, mark.mod, feed.overlap), None)
        return mark

    def _chunk_rows(self, feed: Feed) -> int:
        """Rows of the next query: ``chunk_size``, fewer when the rows are wide, so that a
        chunk holds about ``chunk_max_bytes`` (three chunks are in memory at once). A feed
        whose width is not known yet starts with one row: a table of wide rows must not
        cost ``chunk_size`` of them before the agent knows."""
        width = self._widths.get(feed.name)
        if width is None:
            return 1
        return max(1, min(self.config.chunk_size, self.config.chunk_max_bytes // width))

    async def _run_feed(self, out: Output, feed: Feed, full: bool) -> None:
        """Read a feed to its end, three chunks in flight at most.

        The next chunk is fetched and the current one mapped while the previous one
        commits; a chunk's append is issued only after the previous append committed,
        so a watermark can never be committed ahead of rows that failed to commit.
        """
        chunk = self._chunk_rows(feed)
        fetch: asyncio.Task[list[Row]] | None = asyncio.create_task(
            self.source.db.fetch(chunk_query(feed, self._start(feed, full), chunk))
        )
        commit: asyncio.Task[None] | None = None
        try:
            while fetch is not None:
                rows = await fetch
                fetch = None
                # A stop swallowed inside the driver (see agent.tasks) would otherwise
                # read the rest of the table before the entity loop noticed it.
                tasks.raise_if_cancelling()
                if not rows:
                    break
                last = rows[-1]
                keys = tuple(last[key_label(i)] for i in range(len(feed.keys)))
                mark = Watermark(last[MOD], keys)
                if len(rows) == chunk:
                    self._widths[feed.name] = widest_row(rows)
                    chunk = self._chunk_rows(feed)
                    fetch = asyncio.create_task(
                        self.source.db.fetch(chunk_query(feed, mark, chunk))
                    )
                await _let_run()
                records, bad = await self._map(rows)
                if commit is not None:
                    await commit
                commit = asyncio.create_task(
                    self._commit(out, feed=feed, mark=mark, rows=rows, records=records, bad=bad)
                )
            if commit is not None:
                await commit
        except asyncio.CancelledError:
            for task in (fetch, commit):
                if task is not None and not task.done():
                    task.cancel()
            raise
        except BaseException:
            # Let the query in flight finish: a query cancelled half-way leaks its
            # connection on some drivers (asyncmy). Both are bounded (query_timeout, outbox).
            pending = [t for t in (fetch, commit) if t is not None]
            await asyncio.gather(*pending, return_exceptions=True)
            raise

    async def _commit(
        self,
        out: Output,
        *,
        feed: Feed,
        mark: Watermark,
        rows: Sequence[Row],
        records: list[Record],
        bad: list[Quarantined],
    ) -> None:
        cursor: list[Cursor] = [self._cursor(feed.name, mark)]
        if self.reconciler.enabled and records:
            # Field digests cost about as much as hashing a record: not for the bulk of
            # an initial or full read; the first reconciliation fills them in instead.
            bulk = self.state.full or self.marks.get(feed.name) is None
            cursor.append(self.reconciler.feed_marks(records, fields=not bulk))
        result = await out.append(records, cursor=cursor, dedupe=self.spec.dedupe, quarantine=bad)
        self.marks[feed.name] = mark
        self._count(rows, records, bad, result.unchanged)

    def _count(self, rows: Sequence[Row], records: list[Record], bad: list[Any], same: int) -> None:
        st = self.state
        st.rows += len(rows)
        st.stored += len(records) - same
        st.unchanged += same
        st.quarantined += len(bad)
        st.deletes += sum(1 for r in records if r.op is Op.DELETE)

    async def preview(self, limit: int) -> tuple[list[Record], list[Quarantined]]:
        """The first ``limit`` rows the next pass would read, feed by feed, mapped as a
        pass maps them; nothing is committed and no watermark moves. Before :meth:`load`
        (``edge-agent tap`` never loads) that is a first sync: from the start of the
        initial window. A mapped column missing from the result raises, as in a pass."""
        records: list[Record] = []
        bad: list[Quarantined] = []
        for feed in self.spec.feeds:
            left = limit - len(records) - len(bad)
            if left <= 0:
                break
            rows = await self.source.db.fetch(chunk_query(feed, self._start(feed, False), left))
            got, failed = await self._map(rows)
            records += got
            bad += failed
        return records, bad

    async def reconcile(self, out: Output) -> int:
        """Finish the reconciliation pass in progress, or run a new one, without pauses.

        Returns the number of ``delete`` records it sent (for tests and tools; the
        schedule steps through passes with :meth:`Reconciler.step`).
        """
        return await self.reconciler.run_pass(out, fresh=False)

    async def _map(self, rows: Sequence[Row]) -> tuple[list[Record], list[Quarantined]]:
        ctx = await self.spec.enrich(rows) if self.spec.enrich is not None else None
        # The loop allocates ~20 objects per row and frees them a chunk later; cyclic GC
        # passes in between find nothing but cost a third of the time. No await inside,
        # so no other task runs while collection is paused (bounded by one chunk).
        paused = gc.isenabled()
        gc.disable()
        try:
            return self._map_rows(rows, ctx)
        finally:
            if paused:
                gc.enable()

    def _map_rows(self, rows: Sequence[Row], ctx: Any) -> tuple[list[Record], list[Quarantined]]:
        spec, fmap, mapper = self.spec, self.mapping, self.spec.mapper
        build = entity_builder(self.source.ref, spec.entity_type, spec.precision).build
        if rows:  # a mapped column missing from the result: fail, never write nulls
            mapping.check_columns(self.source.name, spec.name, self.columns, rows[0])
        leave_out = mapping.remote_columns(fmap, rows[0]) if rows else None
        observed = format_time(datetime.now(UTC))  # one time for the chunk, formatted once
        records: list[Record] = []
        bad: list[Quarantined] = []
        # Rows of a chunk often share their modified time (SAP: a date; batch updates):
        # format it once per run of equal values (profiles hand the same object back for
        # a run; equal datetimes with equal ``fold`` are the same instant, hence the same
        # UTC text).
        last_mod: datetime | None = None
        modified: str | None = None
        plain = fmap is None  # no field mappings: inline what mapping.apply would do
        for row in rows:
            try:
                remote_id, data, op, mod = mapper(row, ctx)
                if not plain:
                    data, custom, remote_data = mapping.apply(fmap, data, row, leave_out)
                else:
                    custom = {}
                    remote_data = None
                    if leave_out is not None:
                        remote_data = row.copy()  # a C-level copy and a few deletes
                        for key in leave_out:
                            del remote_data[key]
                if mod is not last_mod:
                    if mod is None:
                        modified = None
                    elif last_mod is None or mod != last_mod or mod.fold != last_mod.fold:
                        modified = rfc3339(mod)
                    last_mod = mod
                records.append(build(remote_id, data, op, custom, remote_data, modified, observed))
            except Exception as exc:  # a bad row is kept aside; the rest flows on
                bad.append(self.quarantine(row, exc))
        return records, bad

    def quarantine(self, row: Row, exc: Exception) -> Quarantined:
        """Log a row that failed to map and wrap it for the outbox's quarantine."""
        keys = [row.get(k) for k in row if k.startswith("_k")]
        log.warning(
            "sql_row_quarantined",
            source=self.source.name,
            entity=self.spec.name,
            key=str(keys),
            error=f"{type(exc).__name__}: {exc}",
        )
        payload = orjson.dumps(row, default=str, option=orjson.OPT_NON_STR_KEYS)
        return Quarantined(
            self.source.name,
            f"mapping_failed: {type(exc).__name__}",
            {"entity": self.spec.name, "key": [str(k) for k in keys], "error": str(exc)},
            payload,
        )
