"""The supervisor: start, supervise, reload and stop everything in one event loop.

Start order is outbox, forwarder, sources; stop order is the reverse, so everything a
source read is committed, and within ``upstream.drain_timeout`` delivered, before exit.
Each source runs in its own supervised task: an unexpected exception is logged, counted,
shown in status, and the source restarts after a jittered backoff; it never takes the
daemon down. A second SIGTERM/SIGINT skips the drain (undelivered records stay queued).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent import __version__, health, logs, systemd
from agent import config as cfg
from agent import sources as source_plugins
from agent.backoff import Backoff
from agent.errors import ConfigError
from agent.forwarder import Forwarder
from agent.health import Component, Kind, RestartLog, State, Tracker, supervised
from agent.horizon import Horizon
from agent.horizon import describe as describe_horizon
from agent.horizon import horizon as buffer_horizon
from agent.outbox import AppendResult, Outbox, OutboxStats
from agent.pipeline import run_source
from agent.records import builder_implementation
from agent.sources.base import Source, SourceConfig, SourceContext

log = structlog.get_logger("agent.app")

RESTART_INITIAL = 1.0
RESTART_CAP = 60.0
HEALTHY_RUN = 60.0  # a source that ran this long before failing restarts from the short delay


@dataclass
class SourceSlot:
    """A configured source, its task and its supervision figures.

    ``tracker`` holds what the supervisor knows of the source (not started yet,
    disabled, crashed and waiting for its restart, stopped); ``restart_log`` tells a
    crash loop from a one-off crash. :meth:`health` merges them with the source's own.
    """

    name: str
    config: SourceConfig
    source: Source | None = None
    task: asyncio.Task[None] | None = None
    restart_log: RestartLog = field(default_factory=lambda: RestartLog(5, 600.0))
    """Set from ``api.ready_crash_loop_restarts`` and ``..._window`` by the supervisor."""
    tracker: Tracker = field(default_factory=lambda: Tracker(State.STARTING, "not started yet"))
    running: bool = False
    """A source instance is in its ``run`` (not crashed, not stopped)."""
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    started_at: float | None = None
    records: int = 0
    unchanged: int = 0
    dropped: int = 0
    quarantined: int = 0
    last_append_at: float | None = None

    def count(self, result: AppendResult, quarantined: int) -> None:
        """Count one committed append of this source's pipeline (status, metrics)."""
        self.records += result.stored
        self.unchanged += result.unchanged
        self.dropped += result.dropped
        self.quarantined += quarantined
        self.last_append_at = time.time()

    def health(self) -> Component:
        """The source as a component: crashed or crash-looping (``failed``), disabled or
        stopped as the supervisor says; else what the source says, with its parts."""
        if self.source is None or self.tracker.state in (State.DISABLED, State.STOPPED):
            return Component(Kind.SOURCE, self.name, self.tracker.health)
        # A crashed instance's parts are stale: shown only while the source runs.
        idle = Component(Kind.SOURCE, self.name, self.tracker.health)
        own = self.source.health() if self.running else idle
        merged = supervised(
            own.health, self.tracker, self.restart_log, self.running, self.last_error
        )
        return Component(Kind.SOURCE, self.name, merged, own.parts)

    def status(self, component: Component | None = None) -> dict[str, Any]:
        """The health (``state``, ``reason``, ``since``, ``detail``, ``parts``), the
        supervisor's figures and the source's own. ``component``: its health, when the
        caller has it already (one judgement for readiness and status)."""
        component = component or self.health()
        own = self.source.status() if self.source is not None else {}
        return {
            "type": self.config.type,
            **component.as_dict(),
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "records": self.records,
            "unchanged": self.unchanged,
            "dropped": self.dropped,
            "quarantined": self.quarantined,
            "last_append_at": self.last_append_at,
            "started_at": self.started_at,
            **{k: v for k, v in own.items() if k not in _HEALTH_KEYS},
            **({"rules": dict(r.counters)} if self.source and (r := self.source.rules) else {}),
        }


_HEALTH_KEYS = frozenset({"state", "reason", "since", "detail", "parts", "records"})


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What :meth:`Agent.snapshot` saw: the components, their readiness, the status."""

    components: list[Component]
    readiness: health.Readiness
    status: dict[str, Any]


@dataclass
class ReloadStatus:
    """What the last reload did (shown in status)."""

    at: float | None = None
    ok: bool | None = None
    error: str | None = None
    changed: list[str] = field(default_factory=list)
    """Every key path that differs from the configuration that ran before."""
    applied: list[str] = field(default_factory=list)
    """The changes now in force (restarted sources, a new token, log level...)."""
    restart_needed: list[str] = field(default_factory=list)
    """The changes only a restart applies (``outbox.*``, ``agent.*``, ``api.listen``...)."""


RESTART_ONLY = (
    "outbox",
    "agent",
    "api.enabled",
    "api.listen",
    "upstream.concurrency",
    "upstream.type",
)
"""Key paths (or whole sections) read only at start: a reload cannot apply them."""

_LIVE_SECTIONS = ("agent", "logging", "outbox", "upstream", "api")


def changed_keys(old: cfg.Settings, new: cfg.Settings) -> list[str]:
    """Key paths that differ: ``sources.<name>`` per source, ``<section>.<key>`` else."""
    keys = [
        f"sources.{name}"
        for name in sorted(set(old.sources) | set(new.sources))
        if old.sources.get(name) != new.sources.get(name)
    ]
    for section in _LIVE_SECTIONS:
        a = getattr(old, section).model_dump()
        b = getattr(new, section).model_dump()
        # an upstream of another type has other keys: each is a change
        keys += [f"{section}.{key}" for key in {**a, **b} if a.get(key) != b.get(key)]
    return keys


def needs_restart(key: str) -> bool:
    """Whether a changed key path applies only at the next restart."""
    return any(key == k or key.startswith(f"{k}.") for k in RESTART_ONLY)


class Agent:
    """The daemon. ``await Agent(settings, path).run()`` returns the exit code."""

    def __init__(self, settings: cfg.Settings, config_file: Path | None = None) -> None:
        self.settings = settings
        self.boot_settings = settings  # what a restart-only key still has in force
        self.config_file = config_file
        self.started_at = time.time()
        self.outbox = Outbox.from_config(settings.outbox, settings.agent.state_dir)
        self.slots: dict[str, SourceSlot] = {}
        self.reload_status = ReloadStatus()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.on_reload: list[Callable[[cfg.Settings], None]] = []
        self.api_ready = False
        self._api_task: asyncio.Task[Any] | None = None
        self.forwarder = Forwarder(
            self.outbox, settings.upstream, settings.agent.id, settings.agent.site
        )
        self.on_reload.append(self.forwarder.reconfigure)
        self.on_reload.append(self._reconfigure_restart_logs)

    # ------------------------------------------------------------------ run

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        await self.outbox.open()
        api_server = None
        try:
            await self.forwarder.start()
            self._spawn(self.outbox.run_maintenance())
            self._spawn(self._watchdog())
            if self.settings.api.enabled:
                api_server = await self._start_api()
            for name, conf in self.settings.sources.items():
                self._start_source(name, conf)
            systemd.notify("READY=1", f"STATUS=running {len(self.slots)} sources")
            log.info(
                "agent_started",
                version=__version__,
                record_builder=builder_implementation(),
                agent_id=self.settings.agent.id,
                outbox=str(self.outbox.path),
                sources=sorted(self.slots),
            )
            await self._stop.wait()
            systemd.notify("STOPPING=1", "STATUS=stopping")
            log.info("agent_stopping")
            await self.unless_forced(self._stop_sources(list(self.slots)))
            if not self._force.is_set():
                await self.forwarder.drain(self.settings.upstream.drain_timeout, self._force)
        finally:
            await self.forwarder.stop()
            if api_server is not None and self._api_task is not None:
                api_server.should_exit = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._api_task, 10)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.outbox.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("agent_stopped")
        return 0

    def request_stop(self) -> None:
        """First call: graceful stop with drain. Second call: skip the drain."""
        if self._stop.is_set():
            log.warning("agent_stop_forced", detail="second signal: skipping the drain")
            self._force.set()
        self._stop.set()

    async def unless_forced(self, coro: Any) -> bool:
        """Await a stop step (stopping sources, draining) unless a second signal comes
        first; then abandon it. Nothing is lost: undelivered records stay in the outbox.
        Returns False when the step was abandoned."""
        step = asyncio.ensure_future(coro)
        forced = asyncio.ensure_future(self._force.wait())
        try:
            await asyncio.wait({step, forced}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forced.cancel()
        if step.done():
            step.result()
            return True
        step.cancel()
        await asyncio.gather(step, return_exceptions=True)
        return False

    async def _start_api(self) -> Any:
        from agent import api  # noqa: PLC0415 - the web stack loads only when enabled

        server = api.make_server(self)
        task = self._api_task = self._spawn(server.serve())
        while not server.started:
            if task.done():  # e.g. the port is taken: say so and carry on without the API
                log.error(
                    "api_failed_to_start",
                    listen=self.settings.api.listen,
                    error=repr(task.exception()) if not task.cancelled() else None,
                )
                return None
            await asyncio.sleep(0.02)
        self.api_ready = True
        log.info("api_listening", listen=self.settings.api.listen)
        return server

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _watchdog(self) -> None:
        interval = systemd.watchdog_interval()
        if interval is None:
            return
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ sources

    def _start_source(self, name: str, conf: SourceConfig) -> None:
        api = self.settings.api
        restarts = RestartLog(api.ready_crash_loop_restarts, api.ready_crash_loop_window)
        slot = SourceSlot(name, conf, restart_log=restarts)
        self.slots[name] = slot
        if not conf.enabled:
            slot.tracker.set(State.DISABLED, "enabled = false in the config")
            return
        slot.task = asyncio.create_task(self._supervise(slot), name=f"source:{name}")

    async def _supervise(self, slot: SourceSlot) -> None:
        backoff = Backoff(RESTART_INITIAL, RESTART_CAP)
        context = SourceContext(agent_id=self.settings.agent.id, site=self.settings.agent.site)
        while True:
            began = time.monotonic()
            try:
                plugin = source_plugins.source_plugin(slot.config.type)
                slot.source = source = plugin.build(slot.name, slot.config, context)
                slot.running = True
                slot.started_at = time.time()
                await run_source(source, self.outbox, rules=plugin.rules, on_commit=slot.count)
                raise RuntimeError("source returned without being cancelled")
            except asyncio.CancelledError:
                slot.running = False
                slot.tracker.set(State.STOPPED, "the source was stopped")
                raise
            except Exception as exc:
                slot.running = False
                slot.restarts += 1
                slot.restart_log.record()
                slot.last_error = f"{type(exc).__name__}: {exc}"
                slot.last_error_at = time.time()
                slot.tracker.set(State.FAILED, slot.last_error)
                if time.monotonic() - began > HEALTHY_RUN:
                    backoff.reset()
                delay = backoff.delay()
                log.exception(
                    "source_failed",
                    source=slot.name,
                    error=slot.last_error,
                    restarts=slot.restarts,
                    retry_in=round(delay, 2),
                    exc_info=exc,
                )
                await asyncio.sleep(delay)

    async def _stop_sources(self, names: list[str]) -> None:
        tasks = [t for n in names if (t := self.slots[n].task) is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ reload

    async def reload(self) -> bool:
        """Re-read the config; apply it if valid, keep the old one running if not."""
        if self._stop.is_set():
            log.warning("config_reload_ignored", detail="the agent is stopping")
            return False
        async with self._reload_lock:  # two quick SIGHUPs apply one after the other
            return await self._reload()

    async def _reload(self) -> bool:
        systemd.reloading()
        self.reload_status = ReloadStatus(at=time.time())
        try:
            if self.config_file is None:
                raise ConfigError([("", "no config file to reload from")])
            new, warnings = await asyncio.to_thread(cfg.load, self.config_file)
        except ConfigError as exc:
            self.reload_status.ok = False
            self.reload_status.error = str(exc)
            # A user's mistake, not a bug: the message names every bad key; no traceback.
            log.error("config_reload_refused", error=str(exc), detail="old config keeps running")
            systemd.notify("READY=1", "STATUS=reload refused: invalid config")
            return False
        for warning in warnings:
            log.warning("config_warning", detail=warning)
        self._apply(new)
        self.reload_status.ok = True
        log.info(
            "config_reloaded",
            applied=self.reload_status.applied,
            restart_needed=self.reload_status.restart_needed,
        )
        systemd.notify("READY=1", f"STATUS=running {len(self.slots)} sources")
        return True

    def _apply(self, new: cfg.Settings) -> list[str]:
        old = self.settings
        self.settings = new
        changed = changed_keys(old, new)
        restart = [c.split(".", 1)[1] for c in changed if c.startswith("sources.")]
        self._spawn(self._restart_sources(restart, new))
        if old.logging != new.logging:
            logs.configure(new.logging.level, new.logging.format)
        for hook in self.on_reload:
            hook(new)
        status = self.reload_status
        status.changed = changed
        status.applied = [k for k in changed if not needs_restart(k)]
        status.restart_needed = [k for k in changed if needs_restart(k)]
        pending = self.restart_needed()
        if pending:
            log.warning(
                "config_change_needs_restart",
                keys=pending,
                detail="applied at the next restart: systemctl restart edge-agent",
            )
        return changed

    def _reconfigure_restart_logs(self, new: cfg.Settings) -> None:
        for slot in self.slots.values():
            slot.restart_log.reconfigure(
                new.api.ready_crash_loop_restarts, new.api.ready_crash_loop_window
            )

    def restart_needed(self) -> list[str]:
        """Changes made since start that only a restart applies (empty when none).

        Compared with the configuration the agent started with, so a change reverted by
        a later reload needs no restart any more.
        """
        return [k for k in changed_keys(self.boot_settings, self.settings) if needs_restart(k)]

    async def _restart_sources(self, names: list[str], new: cfg.Settings) -> None:
        await self._stop_sources([n for n in names if n in self.slots])
        for name in names:
            self.slots.pop(name, None)
            if name in new.sources:
                self._start_source(name, new.sources[name])

    # ------------------------------------------------------------------ status

    def sync_status(self) -> dict[str, Any]:
        """Per SQL source and entity: last sync, status, error, next run, progress."""
        out: dict[str, Any] = {}
        for name, slot in self.slots.items():
            sync = source_plugins.source_plugin(slot.config.type).sync
            if sync is not None and slot.source is not None:
                out[name] = sync.status(slot.source)
        return out

    async def request_sync(self, name: str, entities: list[str] | None, full: bool) -> Any:
        """Ask source ``name`` for a manual (or full) sync. KeyError: no such source;
        TypeError: the source cannot sync on demand."""
        slot = self.slots[name]
        sync = source_plugins.source_plugin(slot.config.type).sync
        if sync is None:
            raise TypeError(f"source {name!r} ({slot.config.type}) does not sync on demand")
        if slot.source is None:
            raise TypeError(f"source {name!r} is not running")
        return sync.request(slot.source, entities, full)

    def components(self) -> list[Component]:
        """Every component's health: the sources (with their parts), the upstream (with
        its sink), the outbox. What readiness, status and metrics all read."""
        return [
            *(slot.health() for slot in self.slots.values()),
            self.forwarder.health(),
            self.outbox.health(),
        ]

    def horizon(self, stats: OutboxStats) -> Horizon:
        """The buffer horizon now (agent.horizon), from ``stats`` and the outbox's flow."""
        box = self.outbox
        return buffer_horizon(
            box.flow,
            max_bytes=box.max_bytes,
            used=stats.bytes,
            when_full=box.when_full,
            readings_max_age=box.readings_max_age,
            oldest_reading_age=stats.oldest_reading_age_seconds,
            min_sample=self.settings.api.horizon_min_sample,
        )

    async def status(self) -> dict[str, Any]:
        """Everything /v1/status shows (never a secret); see :meth:`snapshot`."""
        return (await self.snapshot()).status

    async def snapshot(self) -> Snapshot:
        """One look at every component: their healths, the readiness judged from them
        (what /readyz answers) and the status built from the same healths (what
        /v1/status shows, ``readiness`` included, and /metrics reads)."""
        components = self.components()
        stats = await self.outbox.stats()
        api = self.settings.api
        ahead = self.horizon(stats)
        judged = health.readiness(
            components,
            oldest_age=stats.oldest_age_seconds,
            max_oldest_age=api.ready_max_oldest_age,
            horizon=None if ahead.measuring else ahead.seconds,
            horizon_warn=api.horizon_warn,
            horizon_text=describe_horizon(ahead),
        )
        by_name = {c.name: c for c in components if c.kind is Kind.SOURCE}
        outbox = components[-1]
        status = {
            "version": __version__,
            "record_builder": builder_implementation(),
            "agent_id": self.settings.agent.id,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "readiness": judged.as_dict(),
            "sources": {n: s.status(by_name[n]) for n, s in self.slots.items()},
            "outbox": {
                **stats.as_dict(),
                **outbox.health.as_dict(),
                "when_full": self.outbox.when_full,
                "horizon": ahead.as_dict(),
            },
            "flow": self.outbox.flow.sparklines(),
            "upstream": self.forwarder.status(),
            "reload": {
                "at": self.reload_status.at,
                "ok": self.reload_status.ok,
                "error": self.reload_status.error,
                "changed": self.reload_status.changed,
                "applied": self.reload_status.applied,
                "restart_needed": self.reload_status.restart_needed,
            },
            "restart_needed": self.restart_needed(),
        }
        return Snapshot(components, judged, status)


GC_THRESHOLD = (20_000, 10, 10)
"""Cyclic GC thresholds of the daemon (Python's default: 700, 10, 10)."""


def tune_gc() -> None:
    """Set the cyclic garbage collector up for a long-running ingest daemon (at start-up).

    Every chunk, poll or batch allocates thousands of short-lived containers (rows,
    dicts, records) that reference counting frees; with the default gen-0 threshold of
    700 a 5,000-row SQL chunk triggered about 35 collections that found nothing, and the
    chunks in flight were walked again by gen-1 and gen-2 passes. ``gc.freeze()`` moves
    what start-up allocated (modules, config: a few hundred thousand objects) out of the
    collector's sight, so a full collection no longer walks it. Cycles are still collected,
    just in fewer, larger passes (measured in docs/sql-sources.md, "Performance").
    """
    gc.set_threshold(*GC_THRESHOLD)
    gc.freeze()


async def main(settings: cfg.Settings, config_file: Path | None) -> int:
    """Run the daemon until stopped."""
    agent = Agent(settings, config_file)
    tune_gc()
    with contextlib.suppress(asyncio.CancelledError):
        return await agent.run()
    return 0
