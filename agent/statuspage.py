"""The status page at ``/`` of the local API: server-rendered HTML from the same status
``/v1/status`` answers, for people (site IT, a plant manager on a phone).

Everything shown is rendered here, escaped (source names, reasons and errors come from
the config and from peers). The one script (``agent/web/status.js``) only refreshes
numbers and states in place from ``/v1/status``: every live value carries its JSON path
(``data-k``) and a format (``data-f``), and the script sets ``textContent`` (never HTML);
when the shape changes (a source or a part appears or goes) it reloads the page. Without
JavaScript a ``<meta http-equiv="refresh">`` reloads it. Assets are package data, served
from ``/static/`` (no CDN, no build step); a Content-Security-Policy allows nothing else.

With ``api.require_token_for_reads`` the page asks for the token in a form (POST
``/login``), and sets a cookie holding an HMAC of the token (not the token itself:
HttpOnly, SameSite=Strict); reads accept that cookie in place of the bearer header,
mutations never do. A token in the URL (``?token=``) is refused on purpose: URLs end up
in browser history, proxy logs and screenshots.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape
from importlib import resources
from typing import Any

from agent.outbox_disk import format_bytes

COOKIE = "edge_agent_session"
REFRESH_SECONDS = 5
"""The script's refresh period; the meta refresh (no JavaScript) waits twice as long."""
ASSETS = {"status.css": "text/css; charset=utf-8", "status.js": "text/javascript; charset=utf-8"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def asset(name: str) -> bytes:
    """A file of ``agent/web/`` (package data)."""
    return resources.files("agent").joinpath("web", name).read_bytes()


def session_value(token: str) -> str:
    """The cookie's value for ``token``: changes when the token does (a reload logs out)."""
    return hmac.new(token.encode(), b"edge-agent status page", hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------------- formats
# The script (status.js) formats the same way; tests/test_status_page.py holds them equal.


def duration(seconds: float) -> str:
    """``3d4h``, ``2h5m``, ``4m10s``, ``12s``: the two largest units."""
    rest = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size or (unit == "s" and not parts):
            parts.append(f"{rest // size}{unit}")
            rest %= size
        if len(parts) == 2:
            break
    return "".join(parts)


def _epoch(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def fmt(value: Any, f: str, now: float | None = None) -> str:
    """``value`` as the page shows it in format ``f`` (int, bytes, dur, ago, in, text)."""
    if value is None or value == "":
        return "-"
    now = time.time() if now is None else now
    if f == "int" and isinstance(value, int | float):
        return f"{int(value):,}"
    if f == "bytes" and isinstance(value, int | float):
        return format_bytes(int(value))
    if f == "dur" and isinstance(value, int | float):
        return duration(value)
    if f in {"ago", "in"}:
        at = _epoch(value)
        if at is None:
            return "-"
        return f"{duration(now - at)} ago" if f == "ago" else f"in {duration(at - now)}"
    return str(value)


def get(data: Any, path: Sequence[str]) -> Any:
    """The value at ``path`` in the status (None where it is missing)."""
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def shape(status: dict[str, Any]) -> str:
    """What the page's structure depends on: the sources, their parts, devices and
    entities (status.js computes the same and reloads the page when it changes)."""
    out = []
    for name in sorted(status.get("sources") or {}):
        st = status["sources"][name]
        keys: set[str] = set()
        for group in ("parts", "devices", "entities", "subscriptions"):
            if isinstance(st.get(group), dict):
                keys.update(st[group])
        out.append(name + ":" + ",".join(sorted(keys)))
    return ";".join(out)


# ---------------------------------------------------------------------------- pieces


class _Page:
    """Builds the HTML; ``v`` renders one live value, escaped, with its path and format."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.s = status
        self.now = time.time()

    def v(self, path: Sequence[str], f: str = "text", cls: str = "") -> str:
        text = fmt(get(self.s, path), f, self.now)
        k = escape(json.dumps(list(path)), quote=True)
        c = f' class="{cls}"' if cls else ""
        return f'<span data-k="{k}" data-f="{f}"{c}>{escape(text)}</span>'

    def state(self, path: Sequence[str]) -> str:
        """A state badge (``data-s``: the script sets its class from the state)."""
        st = get(self.s, [*path, "state"]) or "-"
        detail = get(self.s, [*path, "detail"])
        k = escape(json.dumps([*path, "state"]), quote=True)
        badge = f'<span class="badge st-{escape(str(st))}" data-s="{k}">{escape(str(st))}</span>'
        if detail:
            badge += f' <span class="detail">{self.v([*path, "detail"])}</span>'
        return badge


def _table(head: Iterable[str], rows: Iterable[str], cls: str = "") -> str:
    ths = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join(rows)
    return f'<div class="scroll"><table class="{cls}"><tr>{ths}</tr>{body}</table></div>'


def _row(cells: Iterable[str], name: str = "") -> str:
    attr = f' data-name="{escape(name, quote=True)}"' if name else ""
    return f"<tr{attr}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _header(p: _Page) -> str:
    ready = get(p.s, ["readiness", "ready"])
    word = "READY" if ready else "NOT READY"
    reasons = get(p.s, ["readiness", "reasons"]) or []
    warnings = get(p.s, ["readiness", "warnings"]) or []
    items = [f'<li class="reason">{escape(str(r))}</li>' for r in reasons]
    items += [f'<li class="warning">{escape(str(w))}</li>' for w in warnings]
    at = datetime.fromtimestamp(p.now).strftime("%H:%M:%S")
    return (
        f'<header><h1>{escape(str(p.s.get("agent_id", "edge-agent")))}</h1>'
        f'<p class="meta">edge-agent {p.v(["version"])} · up {p.v(["uptime_seconds"], "dur")}'
        f' · <span id="refreshed">rendered {at}</span></p>'
        f'<p class="ready {"yes" if ready else "no"}" id="ready">{word}</p>'
        f'<ul class="readiness" id="readiness">{"".join(items)}</ul></header>'
    )  # fmt: skip


def _horizon(p: _Page) -> str:
    h = ["outbox", "horizon"]
    names = {"business": "business records", "reading": "readings"}
    rows = [
        _row(
            [
                escape(names.get(cls, cls)),
                p.v([*h, "classes", cls, "seconds"], "dur"),
                p.v([*h, "classes", cls, "then"]),
                p.v([*h, "classes", cls, "rows_per_second"]),
            ],
            cls,
        )
        for cls in (get(p.s, [*h, "classes"]) or {})
    ]
    return (
        '<section id="horizon"><h2>Buffer horizon</h2>'
        f'<p class="big">{p.v([*h, "text"])}</p>'
        + _table(["class", "left", "then", "records/s (last hour)"], rows)
        + "</section>"
    )


def _spark(values: Sequence[int], name: str) -> str:
    """An SVG polyline of per-minute counts (the script redraws it)."""
    top = max([1, *values])
    n = max(1, len(values) - 1)
    points = " ".join(f"{i * 300 / n:.1f},{40 - v * 38 / top:.1f}" for i, v in enumerate(values))
    return (
        f'<svg class="spark" viewBox="0 0 300 40" preserveAspectRatio="none" role="img" '
        f'aria-label="{escape(name)} per minute, last hour">'
        f'<polyline data-spark="{escape(name)}" points="{points}"/></svg>'
    )


def _flow(p: _Page) -> str:
    flow = p.s.get("flow") or {}
    parts = []
    for key, label in (("ingest", "records in"), ("delivered", "delivered")):
        values = [int(x) for x in flow.get(key) or []]
        last = values[-1] if values else 0
        parts.append(
            f'<div class="flow"><span class="label">{label} / min</span>'
            f'<span class="now" data-spark-last="{key}">{last:,}</span>{_spark(values, key)}</div>'
        )
    return '<section id="flow"><h2>Last hour</h2>' + "".join(parts) + "</section>"


def _upstream(p: _Page) -> str:
    u = ["upstream"]
    h = ["upstream", "health"] if isinstance(get(p.s, ["upstream", "health"]), dict) else u
    dl = [
        ("state", p.state(h)),
        ("reason", p.v([*h, "reason"])),
        ("url", p.v([*u, "url"])),
        ("last push", p.v([*u, "last_push_at"], "ago")),
        ("last request id", p.v([*u, "last_request_id"], cls="mono")),
        ("last error", p.v([*u, "last_error"])),
        ("next attempt", p.v([*u, "next_attempt_at"], "in")),
        ("sent", p.v([*u, "records", "sent"], "int")),
        ("accepted", p.v([*u, "records", "accepted"], "int")),
        ("rejected", p.v([*u, "records", "rejected"], "int")),
    ]
    return '<section id="upstream"><h2>Upstream</h2>' + _dl(dl) + "</section>"


def _dl(items: Iterable[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _outbox(p: _Page) -> str:
    o = ["outbox"]
    rows = [
        _row(
            [escape(cls), p.v([*o, "rows", cls], "int"), p.v([*o, "bytes", cls], "bytes")],
            cls,
        )
        for cls in (get(p.s, [*o, "rows"]) or {})
    ]
    dropped = get(p.s, [*o, "dropped"]) or {}
    dl = [
        ("state", p.state(o)),
        ("reason", p.v([*o, "reason"])),
        ("undelivered", p.v([*o, "total_rows"], "int")),
        ("bytes", f"{p.v([*o, 'total_bytes'], 'bytes')} of {p.v([*o, 'max_bytes'], 'bytes')}"),
        ("oldest", p.v([*o, "oldest_age_seconds"], "dur")),
        ("dead letters", p.v([*o, "dead_letters"], "int")),
        ("quarantined", p.v([*o, "quarantined"], "int")),
        *((f"dropped: {r}", p.v([*o, "dropped", r], "int")) for r in sorted(dropped)),
    ]
    if not dropped:
        dl.append(("dropped", "none"))
    return (
        '<section id="outbox"><h2>Outbox</h2>'
        + _dl(dl)
        + _table(["class", "records", "bytes"], rows)
        + "</section>"
    )


def _source(p: _Page, name: str, st: dict[str, Any]) -> str:
    s = ["sources", name]
    kind = str(st.get("type", ""))
    dl = [
        ("type", escape(kind)),
        ("state", p.state(s)),
        ("reason", p.v([*s, "reason"])),
        ("records", p.v([*s, "records"], "int")),
        ("quarantined", p.v([*s, "quarantined"], "int")),
        ("restarts", p.v([*s, "restarts"], "int")),
        ("last record", p.v([*s, "last_append_at"], "ago")),
        ("last error", p.v([*s, "last_error"])),
    ]
    body = _dl(dl)
    if isinstance(st.get("devices"), dict):
        body += _devices(p, s, st["devices"])
    if isinstance(st.get("entities"), dict):
        body += _entities(p, s, st["entities"])
    if kind == "mqtt":
        body += _mqtt(p, s)
    return (
        f'<section class="source" data-source="{escape(name, quote=True)}">'
        f"<h3>{escape(name)}</h3>{body}</section>"
    )


def _devices(p: _Page, s: list[str], devices: dict[str, Any]) -> str:
    rows = []
    for dev in sorted(devices):
        d = [*s, "devices", dev]
        rows.append(
            _row(
                [
                    escape(dev),
                    p.v([*d, "unit_id"]),
                    p.state(d),
                    p.v([*d, "last_success"], "ago"),
                    p.v([*d, "polls"], "int"),
                    p.v([*d, "failures"], "int"),
                    p.v([*d, "last_error"]),
                ],
                dev,
            )
        )
    head = ["device", "unit", "state", "last good poll", "polls", "failures", "last error"]
    return "<h4>Modbus units</h4>" + _table(head, rows, "devices")


def _entities(p: _Page, s: list[str], entities: dict[str, Any]) -> str:
    rows = []
    for ent in sorted(entities):
        e = [*s, "entities", ent]
        e_st = entities[ent] if isinstance(entities[ent], dict) else {}
        running = e_st.get("status") == "in_progress"
        progress = ""
        if running:  # a bar: of the known keys on a full sync, else indeterminate
            done = int(get(e_st, ["progress", "rows"]) or 0)
            total = int(e_st.get("known_keys") or 0)
            bar = f'value="{min(done, total)}" max="{total}"' if e_st.get("full") and total else ""
            progress = f' <progress {bar} aria-label="sync progress"></progress>'
        rows.append(
            _row(
                [
                    escape(ent),
                    p.v([*e, "status"]) + progress,
                    p.v([*e, "last_successful_sync_at"], "ago"),
                    p.v([*e, "next_scheduled_at"], "in"),
                    p.v([*e, "progress", "rows"], "int"),
                    p.v([*e, "reconcile", "totals", "drifts"], "int"),
                    p.v([*e, "error"]),
                ],
                ent,
            )
        )
    head = ["entity", "sync", "last sync", "next run", "rows (this run)", "drifts", "error"]
    return "<h4>SQL entities</h4>" + _table(head, rows, "entities")


def _mqtt(p: _Page, s: list[str]) -> str:
    # The rate is the script's: messages between two refreshes (the server has no history).
    rate = escape(json.dumps([*s, "counters", "received"]), quote=True)
    dl = [
        ("broker", p.v([*s, "broker"])),
        ("messages", p.v([*s, "counters", "received"], "int")),
        ("rate", f'<span class="rate" data-rate="{rate}">-</span> /min'),
        ("quarantined", p.v([*s, "quarantined"], "int")),
        ("last message", p.v([*s, "last_message_at"], "ago")),
        ("held (not acked yet)", p.v([*s, "held_messages"], "int")),
    ]  # fmt: skip
    rows = []
    for topic in sorted(get(p.s, [*s, "subscriptions"]) or {}):
        t = [*s, "subscriptions", topic]
        rate = escape(json.dumps([*t, "messages"]), quote=True)
        rows.append(
            _row(
                [
                    f'<span class="mono">{escape(topic)}</span>',
                    p.v([*t, "messages"], "int"),
                    f'<span class="rate" data-rate="{rate}">-</span>',
                    p.v([*t, "quarantined"], "int"),
                ],
                topic,
            )
        )
    table = _table(["subscription", "messages", "/min", "quarantined"], rows, "subscriptions")
    return "<h4>MQTT subscriptions</h4>" + _dl(dl) + (table if rows else "")


def render(status: dict[str, Any]) -> str:
    """The whole page for ``status`` (what ``/v1/status`` answers)."""
    p = _Page(status)
    sources = status.get("sources") or {}
    body = "".join(_source(p, n, sources[n]) for n in sorted(sources))
    if not sources:
        body = "<p>(no sources configured)</p>"
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS * 2}">'
        f"<title>{escape(str(status.get('agent_id', 'edge-agent')))} · edge-agent</title>"
        '<link rel="stylesheet" href="/static/status.css">'
        '<script src="/static/status.js" defer></script></head>'
        f'<body data-shape="{escape(shape(status), quote=True)}" data-refresh="{REFRESH_SECONDS}">'
        + _header(p)
        + '<main><div class="grid">'
        + _horizon(p)
        + _flow(p)
        + _upstream(p)
        + _outbox(p)
        + f'</div><h2>Sources</h2><div class="sources">{body}</div></main>'
        + '<footer><a href="/v1/status">/v1/status</a> · <a href="/metrics">/metrics</a></footer>'
        + "</body></html>"
    )


def login_page(error: str | None = None) -> str:
    """The token form shown while reads need the token and the browser has no session."""
    msg = f'<p class="reason">{escape(error)}</p>' if error else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<title>edge-agent: sign in</title><link rel="stylesheet" href="/static/status.css">'
        '</head><body><main class="login"><h1>edge-agent</h1>'
        "<p>This agent needs its API token to show its status (api.require_token_for_reads).</p>"
        f'{msg}<form method="post" action="/login">'
        '<label>API token <input type="password" name="token" autocomplete="current-password" '
        'required autofocus></label> <button type="submit">Show status</button></form>'
        "</main></body></html>"
    )
