"""Shared fixtures: a private mosquitto broker per test (see tests/helpers/mosquitto.py)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.helpers.mosquitto import Mosquitto, have_mosquitto


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A started private broker (persistence on) on a free port; stopped after the test."""
    if not have_mosquitto():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# Tests that run an agent in-process log through structlog; its default writes to
# stdout, where CLI output that tests parse (``status --json``) goes. Logs go to stderr,
# as the daemon's do, with no level filter (``capture_logs`` sees every event).
structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))


@pytest.fixture(autouse=True)
def _logging_config_restored() -> Iterator[None]:
    """Put structlog's and the root logger's configuration back after each test.

    A test that runs a CLI command in-process (``main(["tap", ...])``) configures logging
    for that command (level ``error``): without this, every later test's
    ``capture_logs()`` would miss warnings, filtered before its processors see them.
    """
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)
