"""Run a real Agent in-process for tests: a temp state dir, a free port, clean stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent import config as cfg
from agent.app import Agent
from tests.helpers.waiting import free_port


def settings_for(tmp: Path, **sections: Any) -> cfg.Settings:
    data: dict[str, Any] = {
        "agent": {"id": "test-agent", "site": "test-site", "state_dir": str(tmp / "state")},
        "upstream": {
            "url": "http://127.0.0.1:9",
            "token": "upstream-secret-token",
            "drain_timeout": "1s",  # no upstream here: a stop need not wait for one
        },
        "api": {"listen": f"127.0.0.1:{free_port()}"},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    settings, _ = cfg.parse(data)
    return settings


@contextlib.asynccontextmanager
async def running_agent(
    settings: cfg.Settings, config_file: Path | None = None
) -> AsyncIterator[Agent]:
    """Start the agent's run() in a task; stop it (graceful) on exit."""
    agent = Agent(settings, config_file)
    task = asyncio.create_task(agent.run())
    async with asyncio.timeout(30):
        while not (agent.outbox._r is not None and (not settings.api.enabled or agent.api_ready)):
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
    try:
        yield agent
    finally:
        agent.request_stop()
        async with asyncio.timeout(60):
            await task
