"""``edge-agent status`` and ``edge-agent sync``: talk to the running agent's local API.

Both commands find the API from the config's ``[api]`` table (or ``--url``). Only that
table is read: ``status`` must keep working when the file on disk was just broken by an
edit (the running agent refused it, and ``status`` is where you see that refusal).

Exit codes (also in docs/operations.md):

====  ================================================================================
0     done (``status``: the agent is ready; ``sync``: the sync was accepted)
1     the agent answered but said no (``status``: not ready; ``sync``: unknown source,
      source cannot sync on demand, bad request)
2     usage or configuration problem on this side (unreadable config or token file,
      no API token configured for ``sync``)
3     the agent is not reachable (not running, wrong address, no answer in time)
4     the agent refused the API token (401), or mutations are disabled on it (403)
====  ================================================================================
"""

from __future__ import annotations

import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from agent.configtypes import format_duration, secret_value
from agent.health import State
from agent.horizon import duration as rough_duration
from agent.outbox_disk import format_bytes

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4

TIMEOUT = 10.0
_ENV_PREFIX = "EDGE_AGENT_API__"


class CtlError(Exception):
    """A one-line problem for the user, with the exit code it maps to."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def api_section(config_file: Path) -> Any:
    """The ``[api]`` table of ``config_file`` (with env overrides), validated alone."""
    from agent.config import ApiSection  # noqa: PLC0415 - the settings root pulls in every plugin

    try:
        with config_file.open("rb") as fh:
            data = tomllib.load(fh).get("api", {})
    except OSError as exc:
        raise CtlError(
            f"{config_file}: cannot read config file: {exc.strerror}", EXIT_USAGE
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise CtlError(f"{config_file}: invalid TOML: {exc}", EXIT_USAGE) from None
    for key, value in os.environ.items():
        if key.upper().startswith(_ENV_PREFIX):
            data[key[len(_ENV_PREFIX) :].lower()] = value
    try:
        return ApiSection.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in ("api", *first["loc"]))
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise CtlError(f"{config_file}: {where}: {msg}", EXIT_USAGE) from None


def base_url(listen: str) -> str:
    """``http://host:port`` for a ``listen`` value; a wildcard bind is reached on loopback."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in {"0.0.0.0", ""}:  # noqa: S104 - not binding, connecting to what was bound
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    try:
        with httpx.Client(timeout=TIMEOUT, trust_env=False) as http:
            return http.request(method, url, **kwargs)
    except httpx.ConnectError as exc:
        reason = "connection refused" if "refused" in str(exc).lower() else str(exc)
        raise CtlError(
            f"edge-agent is not running, or its local API is not at {url} ({reason})",
            EXIT_UNREACHABLE,
        ) from None
    except httpx.TimeoutException:
        raise CtlError(f"no answer from {url} within {TIMEOUT:.0f}s", EXIT_UNREACHABLE) from None
    except httpx.HTTPError as exc:
        raise CtlError(f"request to {url} failed: {exc}", EXIT_UNREACHABLE) from None


def _api_error(resp: httpx.Response) -> str:
    try:
        err = resp.json()["error"]
        return f"{err['message']} ({resp.status_code} {err['code']}, request {err['request_id']})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {resp.status_code}: {resp.text[:200]}"


# ---------------------------------------------------------------------------- status


def fetch_status(url: str, token: str | None = None) -> dict[str, Any]:
    """``/v1/status``, whose ``readiness`` is what ``/readyz`` answers, judged from the
    same healths as the states beside it (asked of ``/readyz`` when an older agent's
    status has none). ``token`` is sent when given (``api.require_token_for_reads``)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = _request("GET", f"{url}/v1/status", headers=headers)
    if resp.status_code == 401:
        raise CtlError(
            "the agent requires the API token for reads and refused this one (401): "
            "api.token / api.token_file in this config differs from the running agent's",
            EXIT_AUTH,
        )
    if resp.status_code != 200:
        raise CtlError(f"status: {_api_error(resp)}", EXIT_REFUSED)
    status: dict[str, Any] = resp.json()
    if "readiness" not in status:
        ready = _request("GET", f"{url}/readyz", headers=headers)
        status["readiness"] = ready.json() if ready.status_code in {200, 503} else None
    return status


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return f"{format_duration(max(0.0, time.time() - ts))} ago"


def _records(st: dict[str, Any]) -> str:
    n = st.get("records", st.get("counters", {}).get("records"))
    return f"{n:,}" if isinstance(n, int) else "-"


def _inner_error(st: dict[str, Any]) -> str | None:
    """The first error of a part of the source (a connection, a device), when the source
    itself reports none: ``connections.gw-a: ConnectionError ...``."""
    for group, parts in st.items():
        if isinstance(parts, dict):
            for name, part in parts.items():
                if isinstance(part, dict) and part.get("last_error"):
                    return f"{group}.{name}: {part['last_error']}"
    return None


def _one_line(text: Any, width: int = 60) -> str:
    s = " ".join(str(text).split()) if text is not None and text != "" else "-"
    s = s or "-"
    return s if len(s) <= width else s[: width - 1] + "…"


def render_status(s: dict[str, Any]) -> str:
    """The readable table ``edge-agent status`` prints."""
    lines: list[str] = []
    ready = s.get("readiness") or {}
    lines.append(
        f"agent     {s['agent_id']}  edge-agent {s['version']}  "
        f"up {format_duration(s['uptime_seconds'])}  "
        f"{'ready' if ready.get('ready') else 'NOT READY'}"
    )
    lines.extend(f"          - {reason}" for reason in ready.get("reasons", []))
    lines.extend(f"          ! {warning}" for warning in ready.get("warnings", []))
    if s.get("record_builder") == "python":
        lines.append(
            "          ! records are built in pure Python (the C builder agent._envelope is "
            "not installed): large SQL syncs run slower"
        )
    lines.extend(_reload_lines(s))
    lines.append("")
    rows = [("SOURCE", "TYPE", "STATE", "RECORDS", "RESTARTS", "LAST ERROR")]
    for name, st in sorted(s.get("sources", {}).items()):
        err = st.get("last_error") or _inner_error(st)
        rows.append(
            (
                name,
                str(st.get("type", "-")),
                _state(st),
                _records(st),
                str(st.get("restarts", 0)),
                _one_line(err) + (f" ({_when(at)})" if (at := st.get("last_error_at")) else ""),
            )
        )
        rows.extend(_part_rows(st))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        cells = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
        lines.append(f"{cells}  {row[5]}")
    if len(rows) == 1:
        lines.append("(no sources configured)")
    lines.append("")
    lines.extend(_upstream_lines(s.get("upstream")))
    lines.extend(_outbox_lines(s.get("outbox", {})))
    return "\n".join(lines)


def _state(h: dict[str, Any]) -> str:
    """A health's state, with its own word when that says more: ``retrying (demoted)``."""
    state = str(h.get("state") or "-")
    return f"{state} ({h['detail']})" if h.get("detail") else state


def _part_rows(st: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """A row per part (device, entity) that is not ``ok``, below its source's row."""
    return [
        (f"  {name}", str(p.get("kind", "-")), _state(p), "", "", _one_line(p.get("reason")))
        for name, p in sorted((st.get("parts") or {}).items())
        if isinstance(p, dict) and p.get("state") not in {State.OK, State.DISABLED}
    ]


def _reload_lines(s: dict[str, Any]) -> list[str]:
    """What the last reload did, and what still waits for a restart."""
    lines: list[str] = []
    rl = s.get("reload") or {}
    if rl.get("at") is not None:
        if rl.get("ok"):
            applied = rl.get("applied", rl.get("changed")) or []
            what = f"applied: {', '.join(applied) or 'nothing changed'}"
            if rl.get("restart_needed"):
                what += f"; needs a restart: {', '.join(rl['restart_needed'])}"
        else:
            what = f"REFUSED, old config still running: {_one_line(rl.get('error'), 200)}"
        lines.append(f"reload    {_when(rl['at'])}: {what}")
    if pending := s.get("restart_needed"):
        lines.append(
            f"          ! RESTART NEEDED to apply: {', '.join(pending)} "
            "(systemctl restart edge-agent)"
        )
    return lines


def _upstream_lines(up: dict[str, Any] | None) -> list[str]:
    if not up:
        return ["upstream  (no forwarder running)"]
    merged = up.get("health")  # the upstream's and its sink's, as readiness judged
    health: dict[str, Any] = merged if isinstance(merged, dict) else up
    out = [f"upstream  state {_state(health)}"]
    if health.get("state") not in {None, State.OK} and health.get("reason"):
        out[0] += f": {_one_line(health['reason'], 100)}"
    scalars = {
        k: v
        for k, v in up.items()
        if k not in {"state", "since", "detail"}
        and isinstance(v, str | int | float)
        and not isinstance(v, bool)
    }
    for key, value in scalars.items():
        shown = _when(value) if key.endswith("_at") and isinstance(value, float) else value
        out.append(f"          {key:<22}{_one_line(shown, 100)}")
    return out


def _outbox_lines(box: dict[str, Any]) -> list[str]:
    rows = box.get("rows", {})
    age = box.get("oldest_age_seconds")
    dropped = box.get("dropped") or {}
    state = ""
    if box.get("state") not in {None, State.OK}:
        state = f"{str(box['state']).upper()}: {_one_line(box.get('reason'), 100)}; "
    out = [
        f"outbox    {state}{box.get('total_rows', 0):,} undelivered "
        f"(business {rows.get('business', 0):,}, readings {rows.get('reading', 0):,}); "
        f"{box.get('total_bytes', 0):,} of {box.get('max_bytes', 0):,} bytes",
        f"          oldest {format_duration(age) if age is not None else '-'}  "
        f"dead letters {box.get('dead_letters', 0):,}  quarantined {box.get('quarantined', 0):,}  "
        f"blocked appends {box.get('blocked_appends', 0)}",
        "          dropped "
        + (", ".join(f"{r} {n:,}" for r, n in sorted(dropped.items())) if dropped else "none"),
    ]
    if ahead := box.get("horizon"):
        out.append(f"          buffer horizon {_horizon_text(ahead)}")
    if disk := box.get("disk"):
        low = "  LOW: appends wait" if disk.get("low") else ""
        out.append(
            f"          disk free {format_bytes(disk['free_bytes'])} of "
            f"{format_bytes(disk['total_bytes'])}, reserve "
            f"{format_bytes(disk['reserve_bytes'])}{low}"
        )
    if box.get("write_errors"):
        out.append(f"          WRITE ERRORS {box['write_errors']}: {box.get('last_write_error')}")
    if box.get("recovered_from"):
        out.append(f"          recovered from a corrupt outbox: {box['recovered_from']}")
    return out


def _horizon_text(ahead: dict[str, Any]) -> str:
    """``about 9 days at the current rate, then ... (business 12 days, readings 9 days)``."""
    text = str(ahead.get("text") or "-")
    if ahead.get("state") == "measuring":
        return text
    names = {"business": "business", "reading": "readings"}
    per = [
        f"{names.get(cls, cls)} {rough_duration(h['seconds'])}, {h['then']}"
        for cls, h in (ahead.get("classes") or {}).items()
        if isinstance(h, dict) and h.get("seconds") is not None
    ]
    return f"{text} ({'; '.join(per)})" if per else text


# ---------------------------------------------------------------------------- watch

_ALT_SCREEN_ON, _ALT_SCREEN_OFF = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"
_HOME_CLEAR = "\x1b[H\x1b[2J"


def watch_frame(url: str, token: str | None, interval: float, width: int, height: int) -> str:
    """One screen of ``status --watch``: a title line and the status table (or why there
    is none: the agent not answering is shown, and watching goes on), cut to the terminal."""
    title = (
        f"edge-agent status {url}  every {interval:g}s  {time.strftime('%H:%M:%S')}  Ctrl-C quits"
    )
    try:
        body = render_status(fetch_status(url, token))
    except CtlError as exc:
        body = f"edge-agent: {exc}"
    lines = [title, "", *body.splitlines()]
    return "\n".join(line[:width] for line in lines[:height])


def watch(url: str, token: str | None, interval: float) -> int:
    """``edge-agent status --watch``: redraw the status every ``interval`` seconds in place
    (the terminal's alternate screen, as ``top`` does; plain frames one after the other
    when stdout is not a terminal), until Ctrl-C, which ends it cleanly (exit 0)."""
    out = sys.stdout
    tty = out.isatty()
    try:
        if tty:
            out.write(_ALT_SCREEN_ON)
        while True:
            size = os.get_terminal_size(out.fileno()) if tty else os.terminal_size((200, 10_000))
            frame = watch_frame(url, token, interval, size.columns, size.lines)
            out.write(_HOME_CLEAR + frame if tty else frame + "\n\n")
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if tty:
            out.write(_ALT_SCREEN_OFF)
            out.flush()


# ---------------------------------------------------------------------------- sync


def request_sync(
    url: str, token: str, source: str, entities: list[str] | None, full: bool
) -> dict[str, Any]:
    """POST /v1/sources/{source}/sync; the agent's 202 answer, or CtlError."""
    body: dict[str, Any] = {"full": full}
    if entities:
        body["entities"] = entities
    resp = _request(
        "POST",
        f"{url}/v1/sources/{source}/sync",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
    )
    if resp.status_code == 202:
        answer: dict[str, Any] = resp.json()
        return answer
    if resp.status_code == 401:
        raise CtlError(
            "the agent refused the API token (401): api.token / api.token_file in this config "
            "differs from the running agent's (reload it after changing the token)",
            EXIT_AUTH,
        )
    if resp.status_code == 403:
        raise CtlError(f"sync refused: {_api_error(resp)}", EXIT_AUTH)
    raise CtlError(f"sync refused: {_api_error(resp)}", EXIT_REFUSED)


def token_of(api: Any, config_file: Path) -> str:
    """The API token from ``[api]``, or CtlError naming what to set."""
    token = secret_value(api.token)
    if token is None:
        raise CtlError(
            f"{config_file}: no api.token or api.token_file: the agent accepts manual syncs "
            "only with a token (set one, then reload the agent)",
            EXIT_USAGE,
        )
    return token


def fail(exc: CtlError) -> int:
    """Print ``exc`` as one line on stderr and return its exit code."""
    print(f"edge-agent: {exc}", file=sys.stderr)
    return exc.code
