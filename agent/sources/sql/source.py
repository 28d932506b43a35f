"""The SQL source: one database, one task per entity, scheduled and on-demand syncs."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog

from agent import tasks
from agent.backoff import Backoff
from agent.errors import ReauthorizationRequired
from agent.health import Component, Kind, State, Tracker, parts, rollup
from agent.records import connection_status
from agent.sources.base import Output, Source, SourceContext
from agent.sources.sql import profiles
from agent.sources.sql.config import SqlSourceConfig
from agent.sources.sql.engine import Database
from agent.sources.sql.sync import EntitySync

log = structlog.get_logger("agent.sources.sql")

REAUTH_RETRY_CAP = 900.0  # credentials rarely come back by themselves: probe slowly


@dataclass
class _Request:
    full: bool = False


class SqlSource(Source):
    """Reads a database incrementally (profiles ``sap_ecc``, ``maximo``, ``declarative``)."""

    system: ClassVar[str] = "sql"
    config: SqlSourceConfig

    def __init__(self, name: str, config: SqlSourceConfig, context: SourceContext) -> None:
        super().__init__(name, config, context)
        self.system = profiles.system_of(config)  # type: ignore[misc]
        self.db = Database(config)
        self.specs = profiles.build(config, self.db)
        self.entities = {s.name: EntitySync(self, s) for s in self.specs}
        self.tracker.set(State.STARTING, "restoring the sync state")
        self._entity_health = {
            name: Tracker(State.STARTING, "first sync pass not done yet") for name in self.entities
        }
        self._running = False
        self.last_error: str | None = None
        self._requests: dict[str, _Request] = {}
        self._wake = {name: asyncio.Event() for name in self.entities}
        self._reported: str | None = None
        self._opened = False

    # ------------------------------------------------------------------ control

    def request_sync(self, entities: list[str] | None = None, full: bool = False) -> list[str]:
        """Sync now (``full``: ignore the watermark). Returns the entities scheduled.

        What ``POST /v1/sources/{name}/sync`` calls. Unknown entity names raise KeyError.
        """
        names = list(entities) if entities else list(self.entities)
        unknown = [n for n in names if n not in self.entities]
        if unknown:
            raise KeyError(f"unknown entities {unknown}; known: {sorted(self.entities)}")
        for name in names:
            req = self._requests.setdefault(name, _Request())
            req.full = req.full or full
            self._wake[name].set()
        log.info("sql_sync_requested", source=self.name, entities=names, full=full)
        return names

    def sync_status(self) -> dict[str, Any]:
        """Per entity: status, last success, next run, progress, error, reconciliation
        (/v1/sync-status)."""
        return {name: e.status() for name, e in self.entities.items()}

    def health(self) -> Component:
        """The entities' healths and the source's from them (:func:`agent.health.rollup`):
        ``starting`` until an entity has read rows or finished a pass, ``degraded`` while
        some entities fail their syncs (retried), ``retrying`` while all do,
        ``reauthorization_required`` when the database refuses the credentials."""
        for name, tracker in self._entity_health.items():
            if tracker.state is State.STARTING and self.entities[name].state.rows > 0:
                tracker.set(State.OK)  # the first pass reads: the database answers
        entities = parts(Kind.ENTITY, {n: t.health for n, t in self._entity_health.items()})
        if self._running:
            self.tracker.set(*rollup(Kind.ENTITY, entities))
        return Component(Kind.SOURCE, self.name, self.tracker.health, entities)

    def status(self) -> dict[str, Any]:
        """Source figures for /v1/status (the URL is shown with its password masked)."""
        return {
            "profile": self.config.profile,
            "url": self.db.display_url,
            "last_error": self.last_error,
            "entities": self.sync_status(),
        }

    # ------------------------------------------------------------------ run

    async def sync_once(
        self,
        out: Output,
        entities: list[str] | None = None,
        *,
        full: bool = False,
        reconcile: bool = False,
    ) -> dict[str, Any]:
        """One pass over ``entities`` (all by default) outside the schedule; errors raise.

        ``reconcile``: then a whole reconciliation pass without pauses (finishing the one
        in progress after a restart, else a new one); a ``full`` pass has one already.
        For tests, tools and one-shot runs; the database stays open until :meth:`aclose`.
        """
        await self.prepare(out)
        for name in entities or list(self.entities):
            entity = self.entities[name]
            await entity.run_pass(out, full=full)
            if reconcile and not (full and entity.reconciler.enabled):
                await entity.reconcile(out)
        return self.sync_status()

    async def prepare(self, out: Output) -> None:
        """Open the database and restore every entity's state (once; :meth:`sync_once`
        does it too). Then ``entities[name].reconcile(out)`` and the like may be called."""
        if not self._opened:
            self.db.open()
            for entity in self.entities.values():
                await entity.load(out)
            self._opened = True

    async def aclose(self) -> None:
        """Close the database opened by :meth:`sync_once`."""
        await self.db.close()
        self._opened = False

    async def run(self, out: Output) -> None:
        """Sync every entity on its schedule until cancelled."""
        self.db.open()
        log.info("sql_source_started", source=self.name, url=self.db.display_url)
        try:
            for entity in self.entities.values():
                await entity.load(out)
            self._running = True
            self.health()
            async with asyncio.TaskGroup() as group:
                for name in self.entities:
                    group.create_task(self._entity_loop(name, out), name=f"sql:{self.name}:{name}")
        finally:
            await self.db.close()

    async def _entity_loop(self, name: str, out: Output) -> None:
        """Incremental passes every ``interval``; between them, reconciliation steps
        spread over ``reconcile_interval``. One task per entity, so a step never runs
        at the same time as a pass of its entity (their appends keep the read order)."""
        entity = self.entities[name]
        backoff = Backoff(self.config.retry_initial, self.config.retry_cap)
        next_run = time.time()  # first pass at once; it resumes from the watermark
        while True:
            tasks.raise_if_cancelling()  # a stop lost inside a driver (asyncmy: see agent.tasks)
            step_at = entity.reconciler.next_step_at()
            await self._wait(name, next_run if step_at is None else min(next_run, step_at))
            req = self._requests.pop(name, None)
            now = time.time()
            passing = req is not None or now >= next_run
            try:
                if passing:
                    await entity.run_pass(out, full=req is not None and req.full)
                elif step_at is not None and now >= step_at:
                    await entity.reconciler.step(out)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = await self._failed(entity, exc, backoff, out)
                if req is not None and req.full:  # keep the request: the full sync is owed
                    self._requests.setdefault(name, _Request()).full = True
                if passing:
                    next_run = time.time() + delay
                entity.reconciler.defer(delay)
            else:
                backoff.reset()
                await self._recovered(out, name)
                if passing:
                    next_run = time.time() + self.config.interval
            entity.state.next_scheduled_at = next_run

    async def _wait(self, name: str, at: float) -> None:
        wake = self._wake[name]
        delay = at - time.time()
        if delay > 0 and not wake.is_set():
            try:
                async with asyncio.timeout(delay):
                    await wake.wait()
            except TimeoutError:
                pass
        wake.clear()

    async def _failed(
        self, entity: EntitySync, exc: Exception, backoff: Backoff, out: Output
    ) -> float:
        entity.state.status = "failed"
        entity.state.error = f"{type(exc).__name__}: {exc}"
        self.last_error = entity.state.error
        tracker = self._entity_health[entity.spec.name]
        if isinstance(exc, ReauthorizationRequired):
            backoff.cap = REAUTH_RETRY_CAP
            tracker.set(State.REAUTH, entity.state.error)
            await self._report(out, "reauthorization_required", exc.reason, str(exc))
        else:
            backoff.cap = self.config.retry_cap
            tracker.set(State.RETRYING, entity.state.error)
        delay = backoff.delay()
        log.error(
            "sql_sync_failed",
            source=self.name,
            entity=entity.spec.name,
            state=self.health().health.state.value,
            error=entity.state.error,
            retry_in=round(delay, 2),
        )
        return delay

    async def _recovered(self, out: Output, name: str) -> None:
        self._entity_health[name].set(State.OK)
        was = self.tracker.state
        if self.health().health.state is State.OK and was is not State.OK:
            self.last_error = None
            if self._reported is not None:
                await self._report(out, "connected", None, None)

    async def _report(
        self, out: Output, state: str, reason: str | None, detail: str | None
    ) -> None:
        """Emit a connection_status record once per state change."""
        if self._reported == state:
            return
        previous, self._reported = self._reported, state  # entity tasks report concurrently
        try:
            await out.append([connection_status(self.ref, state, reason, detail)])
        except Exception as exc:  # the status record must not mask the real failure
            self._reported = previous
            log.error("sql_status_record_failed", source=self.name, error=str(exc))
