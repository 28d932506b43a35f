"""structlog set-up: JSON lines off a terminal (journald), readable on one.

Events are snake_case names with key/value context (``source=``, ``entity=``,
``request_id=``, ``error=``). Secrets never reach a log call: config secrets are
``SecretStr`` (printed as ``**********``) and :func:`redact` scrubs known secret keys
from any mapping that is logged whole.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = ("token", "password", "secret", "authorization", "api_key", "apikey")


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask values of keys that look like secrets."""
    for key in list(event):
        if any(s in key.lower() for s in _SECRET_KEYS) and event[key] is not None:
            event[key] = "**********"
    return event


def library_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor for stdlib records (pymodbus, uvicorn...): their free text moves
    to ``message`` under the event name ``library_log``, so that every event name stays a
    snake_case name one can filter on (``logger`` says which library spoke)."""
    event["message"] = event.get("event")
    event["event"] = "library_log"
    return event


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and the stdlib root logger (libraries log through it)."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, library_event],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries are chatty at INFO (pymodbus, httpx per request); keep them at WARNING.
    root.setLevel(max(numeric, logging.WARNING))
