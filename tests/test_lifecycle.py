"""The daemon's lifecycle as systemd drives it: sd_notify, SIGHUP reload, SIGTERM drain.

The agent runs as a real subprocess (``python -m agent --config F run``) against pymodbus's
own server, so that a source restart is visible in /v1/status (``started_at``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import config as cfg
from agent.app import Agent, SourceSlot
from agent.sources.base import SourceConfig
from tests.agent_harness import settings_for
from tests.agent_process import (
    ModbusServerThread,
    base_config,
    cli,
    modbus_source,
    source_records,
    write_config,
)
from tests.helpers.agentproc import AgentProcess, wait_for


class NotifySocket:
    """A fake systemd notify socket: a real AF_UNIX datagram socket this test binds."""

    def __init__(self) -> None:
        # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer.
        self._dir = tempfile.mkdtemp(prefix="ea-notify-", dir="/tmp")
        self.path = os.path.join(self._dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[list[str]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append(data.decode().split("\n"))

    def seen(self, state: str) -> int:
        return sum(state in m for m in list(self.messages))

    def index(self, state: str, start: int = 0) -> int:
        msgs = list(self.messages)
        return next(i for i in range(start, len(msgs)) if state in msgs[i])

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self._dir)


@pytest.fixture
def modbus() -> Iterator[ModbusServerThread]:
    with ModbusServerThread() as server:
        yield server


def two_source_config(
    tmp: Path, port: int, interval_a: str = "200ms", **sections: Any
) -> dict[str, Any]:
    return base_config(
        tmp,
        sources={"meter_a": modbus_source(port, interval_a), "meter_b": modbus_source(port)},
        **sections,
    )


@pytest.mark.slow
async def test_sd_notify_ready_watchdog_reloading_stopping(
    tmp_path: Path, modbus: ModbusServerThread
) -> None:
    conf = write_config(tmp_path / "config.toml", two_source_config(tmp_path, modbus.port))
    notify = NotifySocket()
    agent = AgentProcess(
        conf, tmp_path / "agent.log", NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="200000"
    )
    try:
        agent.start()
        await wait_for(lambda: notify.seen("READY=1") >= 1, what="READY=1", agent=agent)
        # READY=1 comes after start-up: the API answers by then.
        assert (await agent.get("/healthz")).status_code == 200
        await wait_for(lambda: notify.seen("WATCHDOG=1") >= 3, what="WATCHDOG=1 x3", agent=agent)

        agent.send(signal.SIGHUP)
        await wait_for(lambda: notify.seen("RELOADING=1") == 1, what="RELOADING=1", agent=agent)
        await wait_for(lambda: notify.seen("READY=1") == 2, what="READY=1 again", agent=agent)
        reloading = notify.index("RELOADING=1")
        assert any(s.startswith("MONOTONIC_USEC=") for s in notify.messages[reloading])
        assert notify.index("READY=1", reloading) > reloading

        agent.send(signal.SIGTERM)
        assert await agent.wait_exit() == 0
        assert notify.seen("STOPPING=1") == 1
        assert notify.index("STOPPING=1") > notify.index("READY=1", reloading)
    finally:
        agent.kill()
        notify.close()


@pytest.mark.slow
async def test_reload_restarts_only_the_changed_source_and_refuses_an_invalid_config(
    tmp_path: Path, modbus: ModbusServerThread
) -> None:
    data = two_source_config(tmp_path, modbus.port)
    conf = write_config(tmp_path / "config.toml", data)
    agent = AgentProcess(conf, tmp_path / "agent.log").start()
    try:
        await agent.wait_ready()
        await wait_for(lambda: records(agent, "meter_a", "meter_b", at_least=2), agent=agent)
        before = (await agent.status())["sources"]

        # A changed poll interval restarts that source only.
        same_api = {"api": data["api"]}
        write_config(conf, two_source_config(tmp_path, modbus.port, "300ms", **same_api))
        agent.send(signal.SIGHUP)
        await agent.wait_event("config_reloaded")
        await wait_for(lambda: started_at_changed(agent, "meter_a", before), agent=agent)
        after = await agent.status()
        assert after["reload"] == {**after["reload"], "ok": True, "changed": ["sources.meter_a"]}
        assert after["sources"]["meter_b"]["started_at"] == before["meter_b"]["started_at"]
        assert after["sources"]["meter_b"]["restarts"] == before["meter_b"]["restarts"]
        await wait_for(lambda: records(agent, "meter_a", at_least=2), agent=agent)
        rows_before_bad_reload = (await agent.status())["outbox"]["total_rows"]

        # An invalid config is refused, logged and shown; the old one keeps running.
        bad = json.loads(json.dumps(data))
        bad["sources"]["meter_a"]["devices"]["meter"]["interval"] = "often"
        write_config(conf, bad)
        agent.send(signal.SIGHUP)
        refused = await agent.wait_event("config_reload_refused")
        assert "sources.meter_a.devices.meter.interval" in refused["error"]
        st = await agent.status()
        assert st["reload"]["ok"] is False
        assert "invalid duration 'often'" in st["reload"]["error"]
        assert st["sources"]["meter_a"]["started_at"] == after["sources"]["meter_a"]["started_at"]
        assert st["outbox"]["total_rows"] >= rows_before_bad_reload
        shown = await asyncio.to_thread(cli, "status", config=conf)
        assert "REFUSED, old config still running" in shown.stdout, shown
        await wait_for(lambda: records(agent, "meter_a", "meter_b", at_least=3), agent=agent)
    finally:
        agent.kill()


def records(agent: AgentProcess, *names: str, at_least: int) -> Any:
    async def check() -> bool:
        st = await agent.status()
        return all(source_records(st, n) >= at_least for n in names)

    return check()


def started_at_changed(agent: AgentProcess, name: str, before: dict[str, Any]) -> Any:
    async def check() -> bool:
        st = (await agent.status())["sources"].get(name, {})
        return st.get("started_at") not in (None, before[name]["started_at"])

    return check()


@pytest.mark.slow
async def test_sigterm_stops_cleanly_and_keeps_every_record(
    tmp_path: Path, modbus: ModbusServerThread
) -> None:
    conf = write_config(tmp_path / "config.toml", two_source_config(tmp_path, modbus.port))
    agent = AgentProcess(conf, tmp_path / "agent.log").start()
    try:
        await agent.wait_ready()
        await wait_for(lambda: records(agent, "meter_a", at_least=3), agent=agent)
        st = await agent.status()
        # Counted after the outbox commit: all of these are durably stored.
        produced = sum(source_records(st, n) for n in ("meter_a", "meter_b"))
        agent.send(signal.SIGTERM)
        assert await agent.wait_exit() == 0
    finally:
        agent.kill()
    names = [e["event"] for e in agent.events()]
    assert names.index("agent_stopping") < names.index("agent_stopped")
    assert "agent_stop_forced" not in names
    # Nothing is forwarded on this branch: every record read is still in the outbox.
    stats = await asyncio.to_thread(cli, "outbox", "stats", "--json", config=conf)
    assert json.loads(stats.stdout)["total_rows"] >= produced > 0


@pytest.mark.slow
async def test_second_sigterm_exits_at_once_with_0(
    tmp_path: Path, modbus: ModbusServerThread
) -> None:
    conf = write_config(tmp_path / "config.toml", two_source_config(tmp_path, modbus.port))
    agent = AgentProcess(conf, tmp_path / "agent.log").start()
    try:
        await agent.wait_ready()
        await wait_for(lambda: records(agent, "meter_a", at_least=1), agent=agent)
        # Two stop signals that are both pending when the agent runs again: the kernel
        # merges two pending SIGTERMs into one, so the second is a SIGINT (`Ctrl-C`),
        # which the agent treats the same way. Without the pause, the first stop could
        # finish before the second signal arrives, and the test would prove nothing.
        os.kill(agent.pid, signal.SIGSTOP)
        os.kill(agent.pid, signal.SIGTERM)
        os.kill(agent.pid, signal.SIGINT)
        os.kill(agent.pid, signal.SIGCONT)
        assert await agent.wait_exit() == 0
    finally:
        agent.kill()
    names = [e["event"] for e in agent.events()]
    assert names.count("agent_stop_forced") == 1
    assert names[-1] == "agent_stopped"
    stats = await asyncio.to_thread(cli, "outbox", "stats", "--json", config=conf)
    assert json.loads(stats.stdout)["total_rows"] > 0


async def test_second_stop_request_abandons_a_stop_step_that_hangs(tmp_path: Path) -> None:
    """What a second SIGTERM does to a slow stop step (a drain, a stuck source)."""
    settings = settings_for(tmp_path)
    agent = Agent(settings)
    run = asyncio.create_task(agent.run())
    await wait_for(lambda: agent.api_ready, what="agent up")
    in_stop = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            in_stop.set()
            await asyncio.Event().wait()  # a step that would never finish on its own

    slot = SourceSlot("slow", SourceConfig(type="test"), running=True)
    slot.task = asyncio.create_task(stubborn())
    agent.slots["slow"] = slot
    agent.request_stop()
    await asyncio.wait_for(in_stop.wait(), 10)
    assert not run.done()
    agent.request_stop()
    assert await asyncio.wait_for(run, 30) == 0
    assert slot.task.done()


def test_secret_files_compare_by_content_so_reload_restarts_only_on_change(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "token"
    secret.write_text("one")
    secret.chmod(0o600)
    data = {"upstream": {"url": "http://127.0.0.1:9", "token_file": str(secret)}}
    first, _ = cfg.parse(data)
    again, _ = cfg.parse(data)
    assert first.upstream == again.upstream
    secret.write_text("two")
    changed, _ = cfg.parse(data)
    assert first.upstream != changed.upstream
