"""Task helpers shared by the sources' long-running loops."""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """Raise ``CancelledError`` if the current task was cancelled and the cancel got lost.

    On Python 3.11, ``asyncio.wait_for`` returns a result that arrived while its task was
    being cancelled and drops the cancellation (fixed in 3.12). pymodbus awaits every
    answer with it, aiomqtt every connect, subscribe and disconnect: a stop landing at
    that moment was lost, the loop went on, and the source's stop waited forever (seen as
    hung tests, about one Modbus run in five). ``Task.cancelling()`` still counts the
    request, so loops that call such libraries check it before every wait.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def sleep(seconds: float) -> None:
    """``asyncio.sleep`` after :func:`raise_if_cancelling`."""
    raise_if_cancelling()
    await asyncio.sleep(seconds)
