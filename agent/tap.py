"""``edge-agent tap SOURCE``: what a source would produce right now, shown, written nowhere.

The source's plugin declares the ability (:attr:`~agent.sources.base.SourcePlugin.tap`);
this module runs it and shows each item as it comes: a record as a small table (or, with
``--json``, its envelope on one line, as the upstream would get it), a bad input with
its reason. The outbox is never opened, so a running service is not disturbed (no lock,
no cursor, no acknowledgement; MQTT connects under a client id of its own).

Exit codes: 0 done (also when nothing came), 1 a runtime failure (a peer unreachable,
credentials refused), 2 a usage or config error (unknown source or entity, a source
type without tap, a mapped column the query does not return).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from agent import sources as source_plugins
from agent.config import Settings
from agent.errors import AgentError, ConfigError
from agent.outbox import Quarantined
from agent.records import Record, RetentionClass
from agent.sources.base import SourceConfig, SourceContext, Tap, Tapped, TapRequest

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2

PAYLOAD_SHOWN = 200  # bytes of a bad input's payload in the table view


def plan(settings: Settings, name: str) -> tuple[SourceConfig, Tap[Any]]:
    """The source's config and its tap ability; ConfigError naming what is wrong."""
    configured: dict[str, SourceConfig] = settings.sources
    conf = configured.get(name)
    if conf is None:
        have = ", ".join(sorted(configured)) or "none"
        raise ConfigError([("SOURCE", f"no source named {name!r} (configured: {have})")])
    plugin = source_plugins.source_plugin(conf.type)
    if plugin.tap is None:
        able = [p.type for p in source_plugins.source_plugins() if p.tap is not None]
        raise ConfigError(
            [(f"sources.{name}.type", f"{conf.type!r} sources have no tap "
              f"(types with one: {', '.join(able)})")]
        )  # fmt: skip
    return conf, plugin.tap


async def collect(
    settings: Settings, name: str, request: TapRequest, show: Callable[[Tapped], None]
) -> tuple[int, int]:
    """Run the tap of source ``name``; ``show(item)`` each item as it comes.

    Returns (records, bad inputs). Raises ConfigError (exit 2) or another AgentError
    (exit 1); the items shown before an error stay shown.
    """
    conf, tap = plan(settings, name)
    context = SourceContext(agent_id=settings.agent.id, site=settings.agent.site)
    counts = [0, 0]
    async for item in tap(name, conf, context, request):
        counts[isinstance(item, Quarantined)] += 1
        show(item)
    return counts[0], counts[1]


def run(settings: Settings, name: str, request: TapRequest, as_json: bool) -> int:
    """The ``tap`` command: items on stdout, the summary and errors on stderr."""
    n = [0]

    def show(item: Tapped) -> None:
        n[0] += 1
        if as_json:
            print(json_line(item), flush=True)
        else:
            print(table(item, n[0]), flush=True)

    started = time.monotonic()
    try:
        records, bad = asyncio.run(collect(settings, name, request, show))
    except ConfigError as exc:
        for key, message in exc.problems:
            print(f"tap {name}: {key}: {message}" if key else f"tap {name}: {message}",
                  file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    except (AgentError, OSError) as exc:
        print(f"tap {name}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    print(summary(name, (records, bad), request, time.monotonic() - started), file=sys.stderr)
    return EXIT_OK


def summary(name: str, counts: tuple[int, int], request: TapRequest, waited: float) -> str:
    """One line: what was shown, and whether the wait for input ran out."""
    records, bad = counts
    line = f"tap {name}: {records} record(s), {bad} bad input(s)"
    if waited >= request.timeout:
        line += f"; stopped after --timeout {request.timeout:g}s"
    if not records and not bad:
        line += "; nothing came" if waited >= request.timeout else "; nothing to show"
    return line + "; nothing was written"


# ---------------------------------------------------------------------- views


def json_line(item: Tapped) -> str:
    """A record's envelope (as the upstream gets it, without the outbox's ``seq``), or
    ``{"bad_input": {...}}`` for a bad input, as one line of JSON."""
    if isinstance(item, Record):
        return orjson.dumps(item.envelope()).decode()
    payload = None if item.payload is None else item.payload.decode("utf-8", "replace")
    bad = {"source": item.source, "reason": item.reason, "context": item.context}
    return orjson.dumps({"bad_input": {**bad, "payload": payload}}, default=str).decode()


def _rows(prefix: str, value: Any) -> list[tuple[str, Any]]:
    """Nested dicts flattened to dotted keys (lists and scalars shown as JSON)."""
    if isinstance(value, dict) and value:
        rows: list[tuple[str, Any]] = []
        for key, inner in value.items():
            rows += _rows(f"{prefix}.{key}" if prefix else str(key), inner)
        return rows
    return [(prefix, value)]


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value, default=str).decode()


def table(item: Tapped, n: int) -> str:
    """A record or bad input as a small two-column table, headed by its number."""
    if isinstance(item, Record):
        head = f"#{n} {item.entity_type} {item.op} {item.remote_id}"
        # An entity version's id is chained to the previous version when the outbox
        # stores it; a reading's id is final.
        chained = item.retention is RetentionClass.BUSINESS
        rows: list[tuple[str, Any]] = [
            ("id", f"{item.id} (provisional)" if chained else item.id),
            ("entity_id", item.entity_id),
            ("source", f"{item.source.name} ({item.source.system}, site {item.source.site})"),
            ("observed_at", item.observed_at),
            ("source_modified_at", item.source_modified_at),
            *_rows("data", item.data),
            *(_rows("custom", item.custom) if item.custom else []),
            *(_rows("remote_data", item.remote_data) if item.remote_data else []),
        ]
    else:
        head = f"#{n} BAD INPUT {item.reason}"
        rows = _rows("", item.context)
        if item.payload is not None:
            shown = item.payload[:PAYLOAD_SHOWN]
            more = len(item.payload) - len(shown)
            rows.append(("payload", repr(shown)[2:-1] + (f" ... (+{more} bytes)" if more else "")))
    width = max(len(key) for key, _ in rows)
    return "\n".join([head, *(f"  {key:<{width}}  {_text(value)}" for key, value in rows), ""])
