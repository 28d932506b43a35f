"""Polling helpers shared by the tests: free ports and waiting for a condition.

No test sleeps for a fixed time standing in for "it has happened by now": it polls the
condition and fails at a deadline naming what it waited for (and, through ``detail``,
what the state was then).
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


def _timed_out(what: str, timeout: float, detail: Callable[[], Any] | None) -> AssertionError:
    more = f"\n{detail()}" if detail is not None else ""
    return AssertionError(f"{what}: not met within {timeout:g}s{more}")


def wait_until(
    condition: Callable[[], Any],
    what: str = "condition",
    timeout: float = 30.0,
    detail: Callable[[], Any] | None = None,
) -> Any:
    """Poll ``condition`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, detail)
        time.sleep(0.05)


async def wait_for(
    condition: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout: float = 30.0,
    what: str = "condition",
    detail: Callable[[], Any] | None = None,
) -> Any:
    """Poll ``condition`` (plain or async) on the running loop until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, detail)
        await asyncio.sleep(0.02)
