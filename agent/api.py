"""The local API: health, readiness, status, sync status, metrics, manual sync.

Served inside the agent's own event loop with Starlette on uvicorn's ``Server`` (chosen
because the same stack serves the reference receiver, and Starlette's routing and test
client are small and well kept). Binds 127.0.0.1 by default; the config refuses another
address without a token. Every response carries ``X-Request-ID`` (the caller's, or a new
one) and ``X-API-Version``. Mutations need ``Authorization: Bearer <api.token>``; so do
reads (all but ``/healthz``) with ``api.require_token_for_reads``.
"""

from __future__ import annotations

import contextlib
import hmac
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
import structlog
import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import statuspage
from agent.configtypes import secret_value
from agent.health import Component, Health, Kind, is_up, part_up

if TYPE_CHECKING:
    from agent.app import Agent

log = structlog.get_logger("agent.api")

API_VERSION = "1"
_LOGIN_MAX_BYTES = 4096


class _Json(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=str)


def _error(status: int, code: str, message: str, request: Request) -> Response:
    rid = request.scope.get("request_id")
    return _Json({"error": {"code": code, "message": message, "request_id": rid}}, status)


class RequestIdMiddleware:
    """Pure ASGI middleware: ``X-Request-ID`` and ``X-API-Version`` on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if 0 < len(incoming) <= 128 else str(uuid.uuid4())
        scope["request_id"] = rid

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode("latin-1")))
                headers.append((b"x-api-version", API_VERSION.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, stamped)


class AgentCollector(Collector):
    """Prometheus metrics read from the agent's state at scrape time: the figures from
    the status, every up/down and state from the same component healths readiness
    judges (:mod:`agent.health`)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.snapshot: dict[str, Any] = {}
        self.components: list[Component] = []

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        box = s.get("outbox", {})
        g = GaugeMetricFamily("edge_agent_outbox_rows", "Undelivered records", labels=["class"])
        for cls, n in box.get("rows", {}).items():
            g.add_metric([cls], n)
        yield g
        g = GaugeMetricFamily(
            "edge_agent_outbox_bytes", "Undelivered record bytes", labels=["class"]
        )
        for cls, n in box.get("bytes", {}).items():
            g.add_metric([cls], n)
        yield g
        yield GaugeMetricFamily(
            "edge_agent_outbox_max_bytes", "Outbox byte budget", value=box.get("max_bytes", 0)
        )
        yield GaugeMetricFamily(
            "edge_agent_outbox_oldest_age_seconds",
            "Age of the oldest undelivered record",
            value=box.get("oldest_age_seconds") or 0,
        )
        yield GaugeMetricFamily(
            "edge_agent_dead_letters",
            "Records in the dead-letter table",
            value=box.get("dead_letters", 0),
        )
        yield GaugeMetricFamily(
            "edge_agent_outbox_blocked_appends",
            "Appends waiting for outbox budget",
            value=box.get("blocked_appends", 0),
        )
        c = CounterMetricFamily(
            "edge_agent_dropped", "Records dropped by retention", labels=["reason"]
        )
        for reason, n in box.get("dropped", {}).items():
            c.add_metric([reason], n)
        yield c
        c = CounterMetricFamily(
            "edge_agent_quarantined", "Bad inputs quarantined", labels=["source", "reason"]
        )
        for key, n in box.get("counters", {}).items():
            if key.startswith("quarantined:"):
                _, source, reason = key.split(":", 2)
                c.add_metric([source, reason], n)
        yield c
        yield from self._disk(box.get("disk"))
        yield from self._horizon(box.get("horizon"))
        c = CounterMetricFamily(
            "edge_agent_outbox_write_errors",
            "Failed outbox commits",
            value=box.get("write_errors", 0),
        )
        yield c
        yield from self._sources(s.get("sources", {}), self.components)
        yield from self._devices(s.get("sources", {}), self.components)
        yield from self._reconciliation(s.get("sources", {}))
        yield from self._upstream(s.get("upstream", {}), self.components)
        yield from self._states(self.components)
        yield GaugeMetricFamily(
            "edge_agent_uptime_seconds", "Seconds since start", value=s.get("uptime_seconds", 0)
        )

    @staticmethod
    def _disk(disk: dict[str, Any] | None) -> Iterator[Metric]:
        # No families at all with the reserve off: a 0 would read as "no space left".
        if disk is None:
            return
        yield GaugeMetricFamily(
            "edge_agent_outbox_disk_free_bytes",
            "Free bytes on the outbox's filesystem",
            value=disk["free_bytes"],
        )
        yield GaugeMetricFamily(
            "edge_agent_outbox_disk_reserve_bytes",
            "Free disk space kept for deletes and checkpoints (outbox.disk_reserve)",
            value=disk["reserve_bytes"],
        )
        yield GaugeMetricFamily(
            "edge_agent_outbox_disk_low",
            "1 while the disk is below the reserve (appends wait)",
            value=1 if disk["low"] else 0,
        )

    @staticmethod
    def _horizon(ahead: dict[str, Any] | None) -> Iterator[Metric]:
        """The buffer horizon (agent.horizon): no sample while it is still measuring (an
        alert on a low horizon must not fire on a guess), +Inf while nothing comes in."""
        if ahead is None:
            return
        measuring = ahead["state"] == "measuring"
        yield GaugeMetricFamily(
            "edge_agent_buffer_horizon_measuring",
            "1 while the buffer horizon has too little ingest history (after a start)",
            value=1 if measuring else 0,
        )
        total = GaugeMetricFamily(
            "edge_agent_buffer_horizon_seconds",
            "Seconds the outbox can buffer at the last hour's ingest rate before it "
            "blocks or drops",
        )
        per_class = GaugeMetricFamily(
            "edge_agent_buffer_horizon_class_seconds",
            "Buffer horizon of one retention class",
            labels=["class", "then"],
        )
        rate = GaugeMetricFamily(
            "edge_agent_outbox_ingest_bytes_per_second",
            "Record bytes appended per second, averaged over the last hour",
            labels=["class"],
        )
        inf = float("inf")
        if not measuring:
            total.add_metric([], inf if ahead["seconds"] is None else ahead["seconds"])
        for cls, h in ahead["classes"].items():
            if not measuring:
                seconds = inf if h["seconds"] is None else h["seconds"]
                per_class.add_metric([cls, h["then"]], seconds)
            rate.add_metric([cls], h["bytes_per_second"])
        yield from (total, per_class, rate)

    @staticmethod
    def _states(components: Sequence[Component] = ()) -> Iterator[Metric]:
        """Every component's (and part's) current state, and since when it is in it: what
        /readyz judged, for alerting on ``failed`` or a long ``retrying``. One series per
        component, labelled with its current state (not one per possible state: a Modbus
        source of 200 devices would be 1,800 series, 170 kB a scrape)."""
        labels = ["kind", "component", "state"]
        state = GaugeMetricFamily(
            "edge_agent_component_state", "1, labelled with the component's state", labels=labels
        )
        since = GaugeMetricFamily(
            "edge_agent_component_state_since_timestamp_seconds",
            "When the component entered its current state (Unix time)",
            labels=labels[:2],
        )
        for kind, name, h in _flatten(components):
            state.add_metric([kind, name, h.state.value], 1)
            since.add_metric([kind, name], h.since)
        yield from (state, since)

    @staticmethod
    def _sources(sources: dict[str, Any], components: Sequence[Component] = ()) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "edge_agent_source_up", "1 when the source is healthy", labels=["source", "type"]
        )
        records = CounterMetricFamily(
            "edge_agent_source_records", "Records produced", labels=["source"]
        )
        restarts = CounterMetricFamily(
            "edge_agent_source_restarts", "Source restarts", labels=["source"]
        )
        # Inputs a source had to let go (MQTT QoS 0 over max_held_bytes): its own
        # ``dropped_*`` counters, so monitoring sees loss the outbox never saw.
        lost = CounterMetricFamily(
            "edge_agent_source_inputs_dropped",
            "Inputs dropped by a source before the outbox",
            labels=["source", "reason"],
        )
        healths = {c.name: c.health for c in components if c.kind is Kind.SOURCE}
        for name, st in sources.items():
            h = healths.get(name)
            up.add_metric([name, st.get("type", "")], 1 if h is not None and is_up(h) else 0)
            records.add_metric([name], st.get("records", 0))
            restarts.add_metric([name], st.get("restarts", 0))
            for key, n in (st.get("counters") or {}).items():
                if key.startswith("dropped_"):
                    lost.add_metric([name, key.removeprefix("dropped_")], n)
        yield from (up, records, restarts, lost)

    @staticmethod
    def _devices(sources: dict[str, Any], components: Sequence[Component] = ()) -> Iterator[Metric]:
        """Per Modbus device: what a partly failing source hides in ``edge_agent_source_up``
        (readiness stays 200 when one lift controller is off; alert on these instead)."""
        labels = ["source", "device"]
        up = GaugeMetricFamily("edge_agent_device_up", "1 when the device answers", labels=labels)
        polls = CounterMetricFamily("edge_agent_device_polls", "Polls of the device", labels=labels)
        failures = CounterMetricFamily(
            "edge_agent_device_failures", "Failed polls of the device", labels=labels
        )
        overruns = CounterMetricFamily(
            "edge_agent_device_overruns", "Poll slots skipped (poll overran)", labels=labels
        )
        parts = {
            (c.name, p.name): p.health
            for c in components
            if c.kind is Kind.SOURCE
            for p in c.parts
            if p.kind is Kind.DEVICE
        }
        for name, st in sources.items():
            for device, d in (st.get("devices") or {}).items():
                if not isinstance(d, dict):
                    continue
                key = [name, device]
                h = parts.get((name, device))
                up.add_metric(key, 1 if h is not None and part_up(h) else 0)
                polls.add_metric(key, d.get("polls", 0))
                failures.add_metric(key, d.get("failures", 0))
                overruns.add_metric(key, d.get("overruns", 0))
        yield from (up, polls, failures, overruns)

    @staticmethod
    def _reconciliation(sources: dict[str, Any]) -> Iterator[Metric]:
        """Per SQL entity: rows compared, drifts (changes no feed saw) and hard deletes
        found by content reconciliation since its key set began, and its last pass."""
        labels = ["source", "entity"]
        families = {
            key: CounterMetricFamily(f"edge_agent_sql_reconcile_{key}", text, labels=labels)
            for key, text in (
                ("rows", "Rows compared by reconciliation"),
                ("drifts", "Rows that differed from what the upstream held (a feed missed them)"),
                ("deletes", "Hard deletes found by reconciliation"),
            )
        }
        last = GaugeMetricFamily(
            "edge_agent_sql_last_reconcile_timestamp_seconds",
            "End of the last complete reconciliation pass (Unix time)",
            labels=labels,
        )
        for name, st in sources.items():
            for entity, e in (st.get("entities") or {}).items():
                rec = e.get("reconcile") if isinstance(e, dict) else None
                if not isinstance(rec, dict) or not rec.get("enabled"):
                    continue
                for key, family in families.items():
                    family.add_metric([name, entity], (rec.get("totals") or {}).get(key, 0))
                at = rec.get("last_reconcile_at")
                if at:
                    last.add_metric([name, entity], datetime.fromisoformat(at).timestamp())
        yield from (*families.values(), last)

    @staticmethod
    def _upstream(up: dict[str, Any], components: Sequence[Component] = ()) -> Iterator[Metric]:
        c = CounterMetricFamily(
            "edge_agent_upstream_requests", "Upstream requests by answer", labels=["code"]
        )
        for code, n in up.get("requests", {}).items():
            c.add_metric([str(code)], n)
        yield c
        g = GaugeMetricFamily("edge_agent_upstream_up", "1 when the upstream accepts pushes")
        upstream = [c.health for c in components if c.kind is Kind.UPSTREAM]
        g.add_metric([], 1 if upstream and is_up(upstream[0]) else 0)
        yield g
        # The forwarder keeps these under "records" (they read 0 while looked up at the
        # top level: a bug that hid every delivery from monitoring).
        counts = up.get("records") or {}
        for key in ("sent", "accepted", "duplicates", "rejected"):
            yield CounterMetricFamily(
                f"edge_agent_upstream_records_{key}",
                f"Records {key} (upstream)",
                value=counts.get(key, 0),
            )


def _flatten(components: Sequence[Component]) -> Iterator[tuple[str, str, Health]]:
    """``(kind, name, health)`` of every component and part; a part is named
    ``<component>/<part>`` (``plant/lift-1``), the upstream and the outbox by their kind."""
    for c in components:
        name = c.name or c.kind.value
        yield c.kind.value, name, c.health
        for p in c.parts:
            yield p.kind.value, f"{name}/{p.name}", p.health


def _page_routes(agent: Agent, refused: Callable[..., Response | None]) -> list[Route]:
    """The status page (agent.statuspage): ``/``, its assets, and the token form."""

    def page_headers(**extra: str) -> dict[str, str]:
        return {
            "content-security-policy": statuspage.CSP,
            "x-content-type-options": "nosniff",
            "referrer-policy": "no-referrer",
            "cache-control": "no-store",
            **extra,
        }

    async def page(request: Request) -> Response:
        if "token" in request.query_params:
            return HTMLResponse(
                statuspage.login_page(
                    "a token in the URL is not accepted (it would end up in logs and "
                    "history): enter it here"
                ),
                400,
                headers=page_headers(),
            )
        if refused(request, read=True) is not None:
            return HTMLResponse(statuspage.login_page(), 401, headers=page_headers())
        return HTMLResponse(statuspage.render(await agent.status()), headers=page_headers())

    async def login(request: Request) -> Response:
        token = secret_value(agent.settings.api.token)
        body = b""
        async for chunk in request.stream():  # a token form is small: never hold more
            body += chunk
            if len(body) > _LOGIN_MAX_BYTES:
                return HTMLResponse(statuspage.login_page("too long"), 413, headers=page_headers())
        form = parse_qs(body.decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0]
        if token is None or not hmac.compare_digest(given.encode(), token.encode()):
            log.warning("status_page_login_refused", request_id=request.scope.get("request_id"))
            return HTMLResponse(statuspage.login_page("wrong token"), 401, headers=page_headers())
        answer = RedirectResponse("/", 303, headers=page_headers())
        answer.set_cookie(
            statuspage.COOKIE,
            statuspage.session_value(token),
            httponly=True,
            samesite="strict",
            path="/",
        )
        return answer

    async def logout(request: Request) -> Response:
        answer = RedirectResponse("/", 303, headers=page_headers())
        answer.delete_cookie(statuspage.COOKIE, path="/")
        return answer

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        media = statuspage.ASSETS.get(name)
        if media is None:
            return _error(404, "not_found", f"no asset {name!r}", request)
        return Response(statuspage.asset(name), media_type=media, headers=page_headers())

    return [
        Route("/", page),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/static/{name}", static),
    ]


def build_app(agent: Agent) -> Starlette:
    """The Starlette application for ``agent``."""
    registry = CollectorRegistry(auto_describe=False)
    collector = AgentCollector(agent)
    registry.register(collector)

    def refused(request: Request, *, read: bool) -> Response | None:
        """None when ``request`` may proceed; else the 401/403 answer. Reads are open
        unless ``api.require_token_for_reads``; mutations always need the token."""
        api = agent.settings.api  # read per request: a reloaded token applies at once
        if read and not api.require_token_for_reads:
            return None
        token = secret_value(api.token)
        if token is None:
            return _error(
                403,
                "mutations_disabled",
                "set api.token (or api.token_file) to allow manual syncs",
                request,
            )
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return None
        # The status page's session cookie counts for reads only: a page on another
        # site can make a browser send it, so it must never allow a mutation.
        cookie = request.cookies.get(statuspage.COOKIE, "")
        if read and hmac.compare_digest(cookie.encode(), statuspage.session_value(token).encode()):
            return None
        return _error(401, "unauthorized", "missing or wrong bearer token", request)

    async def healthz(request: Request) -> Response:
        return _Json({"status": "ok", "uptime_seconds": round(time.time() - agent.started_at, 1)})

    async def readyz(request: Request) -> Response:
        if (denied := refused(request, read=True)) is not None:
            return denied
        judged = (await agent.snapshot()).readiness
        return _Json(judged.as_dict(), 200 if judged.ready else 503)

    async def status(request: Request) -> Response:
        if (denied := refused(request, read=True)) is not None:
            return denied
        return _Json(await agent.status())

    async def sync_status(request: Request) -> Response:
        if (denied := refused(request, read=True)) is not None:
            return denied
        return _Json({"sources": agent.sync_status()})

    async def metrics(request: Request) -> Response:
        if (denied := refused(request, read=True)) is not None:
            return denied
        snap = await agent.snapshot()
        collector.snapshot, collector.components = snap.status, snap.components
        return Response(
            generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def sync(request: Request) -> Response:
        if (denied := refused(request, read=False)) is not None:
            return denied
        name = request.path_params["name"]
        try:
            body = orjson.loads(await request.body() or b"{}")
        except orjson.JSONDecodeError as exc:
            return _error(400, "invalid_json", f"request body is not JSON: {exc}", request)
        entities = body.get("entities") if isinstance(body, dict) else None
        full = body.get("full", False) if isinstance(body, dict) else None
        if not isinstance(full, bool) or not (
            entities is None
            or (isinstance(entities, list) and all(isinstance(e, str) for e in entities))
        ):
            return _error(
                400,
                "invalid_request",
                'expected {"entities": [names] (optional), "full": bool}',
                request,
            )
        if name not in agent.slots:
            return _error(404, "unknown_source", f"no source named {name!r}", request)
        try:
            accepted = await agent.request_sync(name, entities, full)
        except KeyError as exc:  # the source knows no such entity
            message = str(exc.args[0]) if exc.args else "unknown entity"
            return _error(404, "unknown_entity", f"source {name!r}: {message}", request)
        except (TypeError, ValueError) as exc:
            return _error(409, "sync_not_possible", str(exc), request)
        log.info(
            "manual_sync_requested",
            source=name,
            entities=entities,
            full=full,
            request_id=request.scope.get("request_id"),
        )
        return _Json({"source": name, "accepted": accepted, "full": full}, 202)

    app = Starlette(
        routes=[
            *_page_routes(agent, refused),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/v1/status", status),
            Route("/v1/sync-status", sync_status),
            Route("/metrics", metrics),
            Route("/v1/sources/{name}/sync", sync, methods=["POST"]),
        ]
    )
    app.add_middleware(RequestIdMiddleware)
    return app


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside the agent's loop; the agent, not uvicorn, owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave SIGTERM/SIGINT/SIGHUP to the supervisor."""
        yield


def make_server(agent: Agent) -> EmbeddedServer:
    """A uvicorn server for the local API on ``api.listen``."""
    host, _, port = agent.settings.api.listen.rpartition(":")
    config = uvicorn.Config(
        build_app(agent),
        host=host.strip("[]"),
        port=int(port),
        log_config=None,
        access_log=False,
        lifespan="off",
        server_header=False,
    )
    return EmbeddedServer(config)
