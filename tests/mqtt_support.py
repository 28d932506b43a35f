"""Helpers of the MQTT source tests: configs, an in-process source, outbox reads."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson

from agent.outbox import Outbox
from agent.sources.base import SourceContext
from agent.sources.mqtt import MqttConfig, MqttSource


def mqtt_config(port: int, **over: Any) -> MqttConfig:
    """A source config for a private broker (fast reconnects for tests)."""
    data: dict[str, Any] = {
        "type": "mqtt",
        "host": "127.0.0.1",
        "port": port,
        "client_id": "agent-test",
        "reconnect_initial": "50ms",
        "reconnect_cap": "500ms",
        "subscriptions": [
            {
                "topic": "site/{site}/lift/{asset}/telemetry",
                "asset": "{asset}",
                "site": "{site}",
                "timestamp_path": "ts",
                "points": [
                    {"name": "load", "path": "load.kg", "type": "float", "unit": "kg"},
                    {"name": "trips", "path": "/counters/trips", "type": "int", "optional": True},
                ],
            }
        ],
    }
    data.update(over)
    return MqttConfig.model_validate(data)


async def until(condition: Callable[[], Any], timeout: float = 20.0, what: str = "it") -> Any:
    """Poll ``condition`` (sync or returning an awaitable) until truthy, with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(
    config: MqttConfig, box: Outbox, name: str = "plant"
) -> AsyncIterator[MqttSource]:
    """Run a source in-process until the block ends (waits until it has subscribed)."""
    source = MqttSource(name, config, SourceContext(agent_id="gw-1", site="site-default"))
    task = asyncio.create_task(source.run(box))
    try:
        await until(lambda: source.state == "connected" or task.done(), what="subscribed")
        if task.done():
            task.result()
        yield source
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def records(box: Outbox) -> list[dict[str, Any]]:
    """Every record envelope in the outbox, in append order."""
    async with box._rdb.execute("SELECT body FROM records ORDER BY seq") as cur:
        return [orjson.loads(b) for (b,) in await cur.fetchall()]


async def quarantine(box: Outbox) -> list[dict[str, Any]]:
    """Quarantined inputs, oldest first."""
    return list(reversed(await box.quarantined(1000)))


def outbox(tmp_path: Path, **kw: Any) -> Outbox:
    """An outbox in the test's temp dir."""
    return Outbox(tmp_path / "outbox.db", **kw)
