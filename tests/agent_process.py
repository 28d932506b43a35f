"""Run the real agent as a subprocess (``python -m agent --config F run``) for tests.

Its stderr goes to a file; stderr is not a TTY there, so the logs are JSON lines, exactly
what journald would get. Helpers poll the local API and the log for conditions with a
deadline (never a bare sleep).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import waiting
from tests.helpers.waiting import free_port

ROOT = Path(__file__).resolve().parents[1]


def toml_dumps(data: dict[str, Any], prefix: str = "") -> str:
    """Just enough TOML for test configs: scalars, lists of scalars, tables, arrays of tables."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in data.items():
        qkey = key if key.replace("-", "").replace("_", "").isalnum() else json.dumps(key)
        is_array_of_tables = isinstance(value, list) and all(isinstance(v, dict) for v in value)
        if isinstance(value, dict) or (value and is_array_of_tables):
            tables.append((qkey, value))
        else:
            lines.append(f"{qkey} = {json.dumps(value)}")
    for qkey, value in tables:
        path = f"{prefix}.{qkey}" if prefix else qkey
        if isinstance(value, list):
            for item in value:
                lines.append(f"\n[[{path}]]")
                lines.append(toml_dumps(item, path))
        else:
            lines.append(f"\n[{path}]")
            lines.append(toml_dumps(value, path))
    return "\n".join(lines)


def base_config(tmp: Path, **sections: Any) -> dict[str, Any]:
    """A minimal valid config with a private state dir and API port."""
    data: dict[str, Any] = {
        "agent": {"id": "proc-agent", "site": "test-site", "state_dir": str(tmp / "state")},
        "logging": {"level": "info", "format": "json"},
        "upstream": {
            "url": "http://127.0.0.1:9",
            "token": "upstream-secret-token",
            "drain_timeout": "1s",  # no upstream here: a stop need not wait for one
        },
        "api": {"listen": f"127.0.0.1:{free_port()}"},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(toml_dumps(data) + "\n")
    return path


def agent_env(**extra: str) -> dict[str, str]:
    """The environment for an agent subprocess: this worktree's package first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "NOTIFY_"))}
    env.pop("WATCHDOG_USEC", None)
    env.pop("WATCHDOG_PID", None)
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def cli(*args: str, config: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m agent [--config F] ARGS`` to completion (the CLI as a user runs it)."""
    cmd = [sys.executable, "-m", "agent"]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(
        [*cmd, *args], cwd=ROOT, env=agent_env(**env), capture_output=True, text=True, timeout=60
    )


class AgentProcess:
    """One agent subprocess on a config file."""

    def __init__(self, config_file: Path, log_file: Path, **env: str) -> None:
        self.config_file = config_file
        self.log_file = log_file
        self.env = agent_env(**env)
        self.proc: subprocess.Popen[bytes] | None = None
        data = __import__("tomllib").loads(config_file.read_text())
        self.url = f"http://{data['api']['listen']}"

    def start(self, **popen: Any) -> AgentProcess:
        with self.log_file.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "--config", str(self.config_file), "run"],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                **popen,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "<not json>", "line": line})
        return out

    def count(self, event: str) -> int:
        return sum(1 for e in self.events() if e.get("event") == event)

    async def wait_event(self, event: str, n: int = 1, timeout: float = 30.0) -> dict[str, Any]:
        await wait_for(lambda: self.count(event) >= n, timeout, f"log event {event} x{n}", self)
        return [e for e in self.events() if e.get("event") == event][n - 1]

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
            return await http.get(self.url + path)

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = (await self.get("/v1/status")).json()
        return result

    async def wait_ready(self, timeout: float = 30.0) -> None:
        async def up() -> bool:
            self.check_alive()
            try:
                return (await self.get("/healthz")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_for(up, timeout, "agent API up", self)

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")

    async def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        proc = self.proc
        await wait_for(lambda: proc.poll() is not None, timeout, "agent exit", self)
        return proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = 30.0,
    what: str = "condition",
    agent: AgentProcess | None = None,
) -> None:
    """:func:`tests.helpers.waiting.wait_for`, failing with the tail of the agent's log."""

    def tail() -> str:
        return "\n".join(agent.log().splitlines()[-30:]) if agent else ""

    await waiting.wait_for(condition, timeout, what, detail=tail)


class ModbusServerThread:
    """pymodbus's own TCP server on 127.0.0.1, in a thread with its own event loop, so
    that it keeps answering while a test blocks (e.g. on a CLI subprocess)."""

    def __init__(self, holding: dict[int, list[int]] | None = None) -> None:
        self.holding = holding or {0: [123, 456]}
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: Any = None

    def __enter__(self) -> ModbusServerThread:
        from tests.modbus_sim import sim_device, start_server  # noqa: PLC0415

        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            start_server([sim_device(1, holding=self.holding)], self.port), self.loop
        )
        self._server = fut.result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._server.shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def modbus_source(port: int, interval: str = "200ms") -> dict[str, Any]:
    """A ``[sources.<name>]`` table polling one holding register of unit 1 on ``port``."""
    return {
        "type": "modbus",
        "connections": {"c": {"host": "127.0.0.1", "port": port, "timeout": "500ms"}},
        "devices": {
            "meter": {
                "connection": "c",
                "unit_id": 1,
                "interval": interval,
                "points": [{"name": "energy", "address": 0, "type": "uint16"}],
            }
        },
    }


def source_records(status: dict[str, Any], name: str) -> int:
    """Records a source has committed so far (0 before its first poll)."""
    source = status.get("sources", {}).get(name, {})
    return int(source.get("counters", {}).get("records", 0))
