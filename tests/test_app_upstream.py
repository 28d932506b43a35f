"""The forwarder inside the supervisor: reload hook, drain on stop, forced stop, status."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from upstream_support import (  # fixtures are used by name
    make_records,
    receiver_fixture,  # noqa: F401
)

from agent import config as cfg
from agent.app import Agent
from agent.forwarder import REAUTH
from agent.outbox import Outbox
from agent.receiver import Receiver
from tests.helpers.waiting import wait_for


def write_config(tmp_path: Path, url: str, token: str, drain: str = "30s") -> Path:
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[agent]
id = "agent-app-test"
state_dir = "{tmp_path}"

[upstream]
url = "{url}"
token_file = "{token_file}"
backoff_initial = "10ms"
backoff_cap = "100ms"
reauth_probe_interval = "10m"
drain_timeout = "{drain}"
"""
    )
    return path


async def start_agent(path: Path) -> tuple[Agent, asyncio.Task[int]]:
    settings, _ = cfg.load(path)
    agent = Agent(settings, path)
    task = asyncio.create_task(agent.run())
    await wait_for(lambda: agent.forwarder.state == "ok", what="agent started")
    return agent, task


async def test_reload_with_a_new_token_ends_reauthorization(
    tmp_path: Path, receiver: Receiver
) -> None:
    path = write_config(tmp_path, receiver.url, "old-token")
    agent, task = await start_agent(path)
    try:
        ids = (await agent.outbox.append(make_records(50))).ids
        await wait_for(lambda: agent.forwarder.state == REAUTH, what="401 seen")
        status = await agent.status()
        assert status["upstream"]["state"] == "reauthorization_required"
        assert status["upstream"]["reason"] == "unauthorized"
        assert "old-token" not in repr(status)
        write_config(tmp_path, receiver.url, receiver.token)
        assert await agent.reload()
        # The probe interval is 10 minutes: only the reload's wake-up can deliver now.
        await wait_for(lambda: receiver.store.count() >= 52, what="delivered after reload")
        assert set(ids) <= receiver.store.ids()
        assert (await agent.status())["upstream"]["state"] == "ok"
    finally:
        agent.request_stop()
        assert await task == 0


async def test_stop_drains_what_is_queued(tmp_path: Path, receiver: Receiver) -> None:
    agent, task = await start_agent(write_config(tmp_path, receiver.url, receiver.token))
    await receiver.stop()
    ids = (await agent.outbox.append(make_records(300))).ids
    await wait_for(lambda: agent.forwarder.state == "retrying", what="upstream down")
    agent.request_stop()
    await receiver.start()  # back while the agent is draining
    assert await task == 0
    assert receiver.store.ids() == set(ids)
    async with Outbox(tmp_path / "outbox.db") as box:
        assert sum((await box.stats()).rows.values()) == 0


async def test_second_stop_skips_the_drain(tmp_path: Path, receiver: Receiver) -> None:
    path = write_config(tmp_path, receiver.url, receiver.token, drain="10m")
    agent, task = await start_agent(path)
    await receiver.stop()
    await agent.outbox.append(make_records(20))
    await wait_for(lambda: agent.forwarder.state == "retrying", what="upstream down")
    agent.request_stop()
    await wait_for(agent._stop.is_set, what="stopping")
    agent.request_stop()
    await wait_for(task.done, 20, "forced stop")
    assert task.result() == 0
    async with Outbox(tmp_path / "outbox.db") as box:
        assert sum((await box.stats()).rows.values()) == 20  # still queued, not lost


async def test_daemon_sighup_with_new_token_then_sigterm(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The real process: records queued before start, 401, SIGHUP with a new token."""
    root = Path(__file__).resolve().parent.parent
    async with Outbox(tmp_path / "outbox.db") as box:
        ids = (await box.append(make_records(40))).ids
    path = write_config(tmp_path, receiver.url, "stale-token")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "--config", str(path), "run"],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_for(lambda: any(e["status"] == 401 for e in receiver.log), 30, "the agent's 401")
        write_config(tmp_path, receiver.url, receiver.token)
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: receiver.store.count() >= 41, 30, "delivery after SIGHUP")
        proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: proc.poll() is not None, 30, "exit after SIGTERM")
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert set(ids) <= receiver.store.ids()
    assert receiver.log[0]["status"] == 401
