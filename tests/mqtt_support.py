"""Helpers of the MQTT source tests: configs, an in-process source, outbox reads."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from agent.outbox import Outbox
from agent.sources.base import SourceContext
from agent.sources.mqtt import MqttConfig, MqttSource
from tests.helpers.waiting import wait_for as until


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


@contextlib.asynccontextmanager
async def running(
    config: MqttConfig, box: Outbox, name: str = "plant"
) -> AsyncIterator[MqttSource]:
    """Run a source in-process until the block ends (waits until it has subscribed)."""
    source = MqttSource(name, config, SourceContext(agent_id="gw-1", site="site-default"))
    task = asyncio.create_task(source.run(box))
    try:
        await until(lambda: source.tracker.state == "ok" or task.done(), what="subscribed")
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
