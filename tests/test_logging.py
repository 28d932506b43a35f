"""Logs: JSON lines off a terminal, readable on one; secrets never in logs, status or metrics."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agent_process import (
    ROOT,
    base_config,
    cli,
    modbus_source,
    write_config,
)
from tests.helpers.agentproc import AgentProcess, agent_env, wait_for
from tests.helpers.waiting import free_port

UPSTREAM_TOKEN = "up-7c1d9e0b-secret"  # from a secret file
API_TOKEN = "api-44aa81f3-secret"  # inline
NUMERIC_SECRET = 987654321987  # an unquoted "token" in a broken reload
TYPO_SECRET = "typo-5b2e-secret"  # a secret under a misspelt key
SECRETS = (UPSTREAM_TOKEN, API_TOKEN, str(NUMERIC_SECRET), TYPO_SECRET)
SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")


def config(tmp: Path, token_file: Path) -> dict[str, Any]:
    dead_port = free_port()  # nothing listens: the upstream and the Modbus device are down
    data = base_config(
        tmp,
        logging={"level": "debug", "format": "auto"},
        api={"token": API_TOKEN},
        sources={"down": modbus_source(dead_port, "100ms")},
    )
    data["upstream"] = {"url": f"http://127.0.0.1:{dead_port}", "token_file": str(token_file)}
    return data


@pytest.mark.slow
async def test_no_secret_in_logs_status_or_metrics_through_errors(tmp_path: Path) -> None:
    token_file = tmp_path / "upstream.token"
    token_file.write_text(UPSTREAM_TOKEN + "\n")
    token_file.chmod(0o600)
    data = config(tmp_path, token_file)
    conf = write_config(tmp_path / "config.toml", data)
    agent = AgentProcess(conf, tmp_path / "agent.log").start()
    try:
        await agent.wait_ready()
        await agent.wait_event("modbus_connection_failed")

        # A manual sync with a wrong token, and one with the right token (logged request).
        async with httpx.AsyncClient(base_url=agent.url, trust_env=False) as http:
            r = await http.post("/v1/sources/down/sync", headers={"Authorization": "Bearer x"})
            assert r.status_code == 401
            auth = {"Authorization": f"Bearer {API_TOKEN}"}
            r = await http.post("/v1/sources/down/sync", json={}, headers=auth)
            assert r.status_code == 409

        # Invalid reloads: a secret as a number (a type error), a secret under a typo.
        for bad_upstream in ({"token": NUMERIC_SECRET}, {"tokn": TYPO_SECRET}):
            bad = json.loads(json.dumps(data))
            bad["upstream"] = {"url": data["upstream"]["url"], **bad_upstream}
            write_config(conf, bad)
            n = agent.count("config_reload_refused")
            agent.send(signal.SIGHUP)
            await agent.wait_event("config_reload_refused", n + 1)

        outputs = {
            "status": (await asyncio.to_thread(cli, "status", config=conf)).stdout,
            "status --json": (await asyncio.to_thread(cli, "status", "--json", config=conf)).stdout,
        }
        for path in ("/v1/status", "/metrics", "/readyz", "/v1/sync-status"):
            outputs[path] = (await agent.get(path)).text
        assert "REFUSED" in outputs["status"]
        assert "upstream.tokn: unknown key" in outputs["status --json"]
        agent.send(signal.SIGTERM)
        assert await agent.wait_exit() == 0
    finally:
        agent.kill()

    outputs["log"] = agent.log()
    for where, text in outputs.items():
        for secret in SECRETS:
            assert secret not in text, f"secret {secret!r} found in {where}"

    events = agent.events()
    names = {e["event"] for e in events}
    assert {"agent_started", "config_reload_refused", "agent_stopped"} <= names
    assert "<not json>" not in names, "a non-JSON line on a non-TTY stderr"
    assert all(SNAKE.match(name) for name in names), sorted(names)
    for e in events:
        assert {"level", "timestamp"} <= set(e), e
    refused = [e for e in events if e["event"] == "config_reload_refused"]
    assert "upstream.token: Input should be a valid string" in refused[0]["error"]
    assert "upstream.tokn: unknown key" in refused[1]["error"]
    failed = [e for e in events if e["event"] == "modbus_connection_failed"]
    assert failed[0]["connection"] == "c"


def test_console_format_on_a_terminal(tmp_path: Path) -> None:
    conf = write_config(
        tmp_path / "c.toml",
        base_config(tmp_path, logging={"level": "info", "format": "auto"}),
    )
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "--config", str(conf), "run"],
        cwd=ROOT,
        env=agent_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=terminal,
    )
    os.close(terminal)
    seen = b""
    try:

        def read_until_started() -> bool:
            nonlocal seen
            seen += os.read(controller, 4096)
            return b"agent_started" in seen

        asyncio.run(wait_for(read_until_started, what="agent_started on the terminal"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        os.close(controller)
    line = next(x for x in seen.decode(errors="replace").splitlines() if "agent_started" in x)
    assert not line.lstrip().startswith("{"), line
    assert "[info" in line or "info" in line.lower()
    assert "agent_id=" in re.sub(r"\x1b\[[0-9;]*m", "", line)
