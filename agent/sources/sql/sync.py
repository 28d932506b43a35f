"""Incremental sync of one entity: chunks, compound watermarks, reconciliation.

Every chunk is mapped to records and committed with ONE ``out.append`` that also carries
the entity's new watermark (cursor ``watermark:<entity>``), so a crash can neither lose
rows (the watermark never runs ahead of the records) nor skip any on restart (the
watermark never lags behind what was committed, and re-sent rows carry equal ids).
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
from agent.sources.sql import keyset, mapping
from agent.sources.sql.model import (
    MOD,
    EntitySpec,
    Feed,
    Row,
    Watermark,
    chunk_query,
    key_label,
    key_query,
    shift_back,
    window_start,
)

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

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view (times as RFC 3339)."""
        return {
            "status": self.status,
            "last_successful_sync_at": _iso(self.last_successful_sync_at),
            "last_started_at": _iso(self.last_started_at),
            "next_scheduled_at": _iso(self.next_scheduled_at),
            "full": self.full,
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


class EntitySync:
    """Sync state and passes of one entity of one SQL source."""

    def __init__(self, source: SqlSource, spec: EntitySpec) -> None:
        self.source = source
        self.spec = spec
        self.config = source.config
        self.mapping = source.config.mappings.get(spec.name)
        self.tz = ZoneInfo(source.config.timezone)
        self.marks: dict[str, Watermark | None] = {f.name: None for f in spec.feeds}
        self.state = SyncState()
        self.known: str | None = None
        self.added: keyset.AddedKeys | None = None
        self.columns = mapping.mapped_columns(
            spec.name, spec.extra.get("columns", {}), self.mapping
        )

    @property
    def cursor_key(self) -> str:
        """Outbox cursor key of this entity's watermark."""
        return f"watermark:{self.spec.name}"

    @property
    def keys_key(self) -> str:
        """Outbox cursor key of this entity's known key set."""
        return f"keys:{self.spec.name}"

    async def load(self, out: Output) -> None:
        """Restore watermarks and sync times committed before a restart."""
        value = await out.cursor(self.source.name, self.cursor_key)
        if isinstance(value, dict):
            for name, mark in (value.get("feeds") or {}).items():
                if name in self.marks:
                    self.marks[name] = Watermark.decode(mark)
            self.state.last_successful_sync_at = value.get("last_successful_sync_at")
            self.state.last_reconcile_at = value.get("last_reconcile_at")
        known = await out.cursor(self.source.name, self.keys_key)
        self.known = known if isinstance(known, str) else None

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
        """Read every feed from its watermark (or the start, when ``full``) to the end."""
        st = self.state
        st.status, st.full, st.error = "in_progress", full, None
        st.last_started_at = time.time()
        st.rows = st.stored = st.unchanged = st.quarantined = st.deletes = 0
        log.info("sql_sync_started", source=self.source.name, entity=self.spec.name, full=full)
        try:
            for feed in self.spec.feeds:
                await self._run_feed(out, feed, full)
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

    async def _run_feed(self, out: Output, feed: Feed, full: bool) -> None:
        """Read a feed to its end, three chunks in flight at most.

        The next chunk is fetched and the current one mapped while the previous one
        commits; a chunk's append is issued only after the previous append committed,
        so a watermark can never be committed ahead of rows that failed to commit.
        """
        chunk = self.config.chunk_size
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
        result = await out.append(
            records, cursor=self._cursor(feed.name, mark), dedupe=self.spec.dedupe, quarantine=bad
        )
        self.marks[feed.name] = mark
        self._count(rows, records, bad, result.unchanged)
        await self._track(records)

    def _count(self, rows: Sequence[Row], records: list[Record], bad: list[Any], same: int) -> None:
        st = self.state
        st.rows += len(rows)
        st.stored += len(records) - same
        st.unchanged += same
        st.quarantined += len(bad)
        st.deletes += sum(1 for r in records if r.op is Op.DELETE)

    async def _track(self, records: list[Record]) -> None:
        """Remember upserted ids for the next reconciliation (when reconciling at all)."""
        if self.config.reconcile_interval is None or not records:
            return
        if self.added is None:
            self.added = await asyncio.to_thread(keyset.AddedKeys)
        upserted = [r.remote_id for r in records if r.op is Op.UPSERT]
        deleted = [r.remote_id for r in records if r.op is Op.DELETE]
        await asyncio.to_thread(self.added.update, upserted, deleted)

    @property
    def added_count(self) -> int:
        """Ids upserted since the last reconciliation."""
        return 0 if self.added is None else self.added.count

    def close(self) -> None:
        """Drop temporary files."""
        if self.added is not None:
            self.added.close()
            self.added = None

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
                bad.append(self._quarantine(row, exc))
        return records, bad

    def _quarantine(self, row: Row, exc: Exception) -> Quarantined:
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

    # ------------------------------------------------------------------ reconciliation

    async def reconcile(self, out: Output) -> int:
        """Compare all keys with the known set; emit ``delete`` for keys that vanished."""
        diff = await asyncio.to_thread(keyset.KeyDiff)
        try:
            await self._scan_keys(diff)
            await asyncio.to_thread(diff.add_known, keyset.unpack(self.known))
            if self.added is not None:
                await asyncio.to_thread(diff.add_known, self.added)
            deletes = await self._emit_deletes(out, diff)
            blob = await asyncio.to_thread(diff.packed_current)
            self.state.known_keys = await asyncio.to_thread(diff.count_current)
        finally:
            await asyncio.to_thread(diff.close)
        self.state.last_reconcile_at = time.time()
        await out.append(
            (),
            cursor=Cursor(self.source.name, self.keys_key, blob),
        )
        await out.append((), cursor=self._cursor())
        self.known = blob
        if self.added is not None:
            await asyncio.to_thread(self.added.clear)
        self.state.reconcile_deletes += deletes
        log.info(
            "sql_reconciled",
            source=self.source.name,
            entity=self.spec.name,
            keys=self.state.known_keys,
            deletes=deletes,
        )
        return deletes

    async def _scan_keys(self, diff: keyset.KeyDiff) -> None:
        after: tuple[Any, ...] | None = None
        chunk = self.config.chunk_size
        while True:
            rows = await self.source.db.fetch(key_query(self.spec, after, chunk))
            if not rows:
                return
            tuples = [tuple(r.values()) for r in rows]
            await asyncio.to_thread(diff.add_current, [self.spec.remote_id(t) for t in tuples])
            after = tuples[-1]
            if len(rows) < chunk:
                return

    async def _emit_deletes(self, out: Output, diff: keyset.KeyDiff) -> int:
        batches = diff.vanished(self.config.chunk_size)
        total = 0
        empty: list[str] = []
        while batch := await asyncio.to_thread(next, batches, empty):
            now = datetime.now(UTC)
            records = [
                Record.entity(
                    self.source.ref,
                    self.spec.entity_type,
                    rid,
                    {"deleted": True, "reason": "not_found_in_source"},
                    op=Op.DELETE,
                    source_modified_at=now,
                    modified_precision=self.spec.precision,
                )
                for rid in batch
            ]
            result = await out.append(records, dedupe=self.spec.dedupe)
            total += len(records) - result.unchanged
        return total
