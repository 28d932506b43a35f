"""Configs and peers for the tests that run the real agent: TOML for a config dict, a
minimal valid config, the CLI run to completion, a pymodbus server in a thread.

The agent subprocess itself is :class:`tests.helpers.agentproc.AgentProcess`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tests.helpers.agentproc import agent_env
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


def cli(*args: str, config: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m agent [--config F] ARGS`` to completion (the CLI as a user runs it)."""
    cmd = [sys.executable, "-m", "agent"]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(
        [*cmd, *args], cwd=ROOT, env=agent_env(**env), capture_output=True, text=True, timeout=60
    )


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
