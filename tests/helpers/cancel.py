"""Reproduce Python 3.11's lost cancellation (asyncio.wait_for) around a real call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


async def swallowing(call: Callable[[], Awaitable[Any]], started: asyncio.Event) -> Any:
    """Await ``call()`` as 3.11's ``asyncio.wait_for`` can: a cancel that lands while the
    result is on its way is dropped, and the result returned. ``started`` is set once the
    call is under way (it answers 0.2 s later, so a cancel sent then lands in the window)."""

    async def slow() -> Any:
        await asyncio.sleep(0.2)
        return await call()

    inner = asyncio.ensure_future(slow())
    started.set()
    try:
        return await asyncio.shield(inner)
    except asyncio.CancelledError:
        return await inner  # the result came: returned, the cancellation lost


async def assert_stops_after_swallowed_cancel(
    task: asyncio.Task[Any], started: asyncio.Event, what: str
) -> None:
    """Cancel ``task`` while a :func:`swallowing` call is under way; it must still stop."""
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done, f"{what} went on after its cancellation was swallowed"
    assert task.cancelled()
