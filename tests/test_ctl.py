"""``edge-agent status`` and ``edge-agent sync`` against a real running agent."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import ctl
from agent.__main__ import main
from agent.app import SourceSlot
from agent.sources.base import SourceConfig
from tests.agent_harness import running_agent, settings_for
from tests.agent_process import (
    ModbusServerThread,
    base_config,
    cli,
    modbus_source,
    source_records,
    write_config,
)
from tests.helpers.agentproc import AgentProcess, wait_for
from tests.helpers.waiting import free_port

API_TOKEN = "ctl-api-token-5f1e"


@pytest.fixture
def agent_with_modbus(tmp_path: Path) -> Iterator[tuple[AgentProcess, Path]]:
    with ModbusServerThread() as server:
        data = base_config(
            tmp_path, api={"token": API_TOKEN}, sources={"meters": modbus_source(server.port)}
        )
        conf = write_config(tmp_path / "config.toml", data)
        agent = AgentProcess(conf, tmp_path / "agent.log").start()
        try:
            asyncio.run(agent.wait_ready())
            yield agent, conf
        finally:
            agent.kill()


def records_of(status: dict[str, Any]) -> int:
    return source_records(status, "meters")


@pytest.mark.slow
def test_status_table_and_json(agent_with_modbus: tuple[AgentProcess, Path]) -> None:
    _, conf = agent_with_modbus
    asyncio.run(wait_for(lambda: source_records(cli_json(conf), "meters") > 0))

    r = cli("status", config=conf)
    assert r.returncode in (ctl.EXIT_OK, ctl.EXIT_REFUSED), r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("agent     proc-agent  edge-agent ")
    row = next(line for line in lines if line.startswith("meters "))
    assert row.split()[:3] == ["meters", "modbus", "ok"]
    assert any(line.startswith("outbox ") and "undelivered" in line for line in lines)
    assert any("dead letters 0" in line for line in lines)
    assert any(line.strip() == "dropped none" for line in lines)
    assert API_TOKEN not in r.stdout

    status = cli_json(conf)
    assert status["agent_id"] == "proc-agent"
    assert set(status["readiness"]) == {"ready", "reasons", "warnings"}
    assert records_of(status) > 0
    # The exit code follows readiness: a monitoring check can use it directly.
    expect = ctl.EXIT_OK if status["readiness"]["ready"] else ctl.EXIT_REFUSED
    assert cli("status", "--json", config=conf).returncode == expect


def cli_json(conf: Path) -> dict[str, Any]:
    r = cli("status", "--json", config=conf)
    assert r.returncode in (ctl.EXIT_OK, ctl.EXIT_REFUSED), r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


@pytest.mark.slow
def test_sync_errors_are_one_line_with_documented_codes(
    agent_with_modbus: tuple[AgentProcess, Path], tmp_path: Path
) -> None:
    agent, _ = agent_with_modbus
    listen = agent.url.removeprefix("http://")

    # Right token (from a token file), but a Modbus source cannot sync on demand.
    token_file = tmp_path / "api.token"
    token_file.write_text(API_TOKEN + "\n")
    token_file.chmod(0o600)
    good = write_config(
        tmp_path / "good.toml",
        base_config(tmp_path, api={"listen": listen, "token_file": str(token_file)}),
    )
    r = cli("sync", "meters", config=good)
    assert r.returncode == ctl.EXIT_REFUSED
    assert "does not sync on demand" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    r = cli("sync", "nope", "--full", config=good)
    assert r.returncode == ctl.EXIT_REFUSED
    assert "no source named 'nope'" in r.stderr

    wrong = write_config(
        tmp_path / "wrong.toml", base_config(tmp_path, api={"listen": listen, "token": "not-it"})
    )
    r = cli("sync", "meters", config=wrong)
    assert r.returncode == ctl.EXIT_AUTH
    assert "refused the API token" in r.stderr
    assert "not-it" not in r.stderr + r.stdout
    assert len(r.stderr.strip().splitlines()) == 1

    none = write_config(tmp_path / "none.toml", base_config(tmp_path, api={"listen": listen}))
    r = cli("sync", "meters", config=none)
    assert r.returncode == ctl.EXIT_USAGE
    assert "no api.token or api.token_file" in r.stderr


def test_agent_not_running_is_one_clear_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    conf = write_config(
        tmp_path / "c.toml",
        base_config(tmp_path, api={"listen": f"127.0.0.1:{port}", "token": "t"}),
    )
    for args in (("status",), ("status", "--json"), ("sync", "x")):
        r = cli(*args, config=conf)
        assert r.returncode == ctl.EXIT_UNREACHABLE, r
        assert r.stderr.count("\n") == 1
        assert "edge-agent is not running" in r.stderr
        assert "connection refused" in r.stderr
        assert "Traceback" not in r.stderr
    r = cli("status", "--url", f"http://127.0.0.1:{port}")
    assert r.returncode == ctl.EXIT_UNREACHABLE
    r = cli("status", config=tmp_path / "missing.toml")
    assert r.returncode == ctl.EXIT_USAGE
    assert "cannot read config file" in r.stderr


def test_status_reads_only_the_api_table_of_a_broken_config(tmp_path: Path) -> None:
    # A file broken by an edit (the running agent refused it) must not stop `status`.
    port = free_port()
    conf = tmp_path / "c.toml"
    conf.write_text(f'[api]\nlisten = "127.0.0.1:{port}"\n[upstream]\nbogus_key = 1\n')
    r = cli("status", config=conf)
    assert r.returncode == ctl.EXIT_UNREACHABLE
    assert f"127.0.0.1:{port}" in r.stderr


class OnDemandSource:
    """Stands in for a SQL source (not on this branch): records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[list[str] | None, bool]] = []

    def request_sync(self, entities: list[str] | None, full: bool) -> list[str]:
        self.asked.append((entities, full))
        return entities or ["work_order", "asset"]

    def status(self) -> dict[str, Any]:
        return {"state": "idle"}


async def test_sync_passes_entities_and_full_to_the_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(tmp_path, api={"token": API_TOKEN})
    conf = write_config(
        tmp_path / "c.toml",
        base_config(tmp_path, api={"listen": settings.api.listen, "token": API_TOKEN}),
    )
    async with running_agent(settings) as agent:
        source = OnDemandSource()
        agent.slots["erp"] = SourceSlot(
            "erp",
            settings.sources.get("erp") or _conf(),
            source=source,  # type: ignore[arg-type]
        )
        argv = ["--config", str(conf), "sync", "erp", "--entity", "work_order", "--entity", "asset"]
        assert await asyncio.to_thread(main, [*argv, "--full"]) == ctl.EXIT_OK
        assert await asyncio.to_thread(main, ["--config", str(conf), "sync", "erp"]) == 0
    assert source.asked == [(["work_order", "asset"], True), (None, False)]
    # (structlog's unconfigured default also prints to stdout: keep only the CLI's lines)
    out = [line for line in capsys.readouterr().out.splitlines() if " requested (" in line]
    assert (
        out[0] == "full sync of erp requested (entities: work_order, asset); see edge-agent status"
    )
    assert out[1].startswith("sync of erp requested")


def _conf() -> Any:
    return SourceConfig(type="sql")


def test_render_status_shows_errors_upstream_drops_and_dead_letters() -> None:
    now = time.time()
    status = {
        "version": "0.1.0",
        "agent_id": "gw1",
        "uptime_seconds": 3725.0,
        "readiness": {"ready": False, "reasons": ["upstream is retrying: 503"]},
        "reload": {"at": now - 60, "ok": True, "error": None, "changed": ["sources.a"]},
        "sources": {
            "a": {"type": "mqtt", "state": "failed", "restarts": 3, "records": 1200,
                  "last_error": "ConnectionRefusedError: [Errno 111]\nrefused",
                  "last_error_at": now - 5},
            "b": {"type": "modbus", "state": "degraded", "restarts": 0, "last_error": None,
                  "connections": {"gw": {"state": "disconnected", "last_error": "timeout"}}},
        },
        "upstream": {"state": "retrying", "last_request_id": "req-42", "last_error": "503",
                     "last_success_at": now - 120.0, "requests": {"503": 2}, "in_flight": 0},
        "outbox": {"rows": {"business": 5, "reading": 7}, "total_rows": 12, "total_bytes": 900,
                   "max_bytes": 10_000, "oldest_age_seconds": 90.0, "dead_letters": 2,
                   "quarantined": 1, "dropped": {"budget": 40}, "blocked_appends": 0,
                   "disk": {"free_bytes": 800 << 10, "total_bytes": 4 << 20, "low": True,
                            "reserve_bytes": 1 << 20}},
    }  # fmt: skip
    text = ctl.render_status(status)
    lines = text.splitlines()
    assert lines[0] == "agent     gw1  edge-agent 0.1.0  up 1h2m5s  NOT READY"
    assert lines[1] == "          - upstream is retrying: 503"
    assert lines[2] == "reload    1m ago: applied: sources.a"
    row_a = next(line for line in lines if line.startswith("a "))
    assert row_a.split()[:5] == ["a", "mqtt", "failed", "1,200", "3"]
    assert row_a.endswith("ConnectionRefusedError: [Errno 111] refused (5s ago)")
    row_b = next(line for line in lines if line.startswith("b "))
    assert row_b.endswith("connections.gw: timeout")
    assert "upstream  state retrying" in lines
    assert "          in_flight             0" in lines  # a 0 is a 0, not "-"
    assert any("last_request_id" in line and "req-42" in line for line in lines)
    assert any("last_success_at" in line and "2m ago" in line for line in lines)
    assert "          dropped budget 40" in lines
    assert any("dead letters 2  quarantined 1" in line for line in lines)
    assert "          disk free 800.0 KiB of 4.0 MiB, reserve 1.0 MiB  LOW: appends wait" in lines


def test_render_status_lists_parts_that_are_not_ok_and_the_outbox_state() -> None:
    status = {
        "version": "0.1.0",
        "agent_id": "gw1",
        "uptime_seconds": 60.0,
        "readiness": {"ready": False, "reasons": ["outbox: disk below reserve"], "warnings": [
            "source meters is degraded: devices not answering: lift-2 (no answer (timeout))",
        ]},
        "sources": {
            "meters": {"type": "modbus", "state": "degraded", "restarts": 0, "records": 5,
                       "reason": "devices not answering: lift-2 (no answer (timeout))",
                       "parts": {
                           "lift-1": {"kind": "device", "state": "ok", "detail": "online"},
                           "lift-2": {"kind": "device", "state": "retrying",
                                      "detail": "demoted", "reason": "no answer (timeout)"},
                       }},
        },
        "upstream": {"state": "ok", "health": {"state": "retrying", "reason": "sink down"}},
        "outbox": {"rows": {}, "state": "blocked", "reason": "disk below reserve"},
    }  # fmt: skip
    lines = ctl.render_status(status).splitlines()
    assert "          ! source meters is degraded: devices not answering: lift-2 (no answer (timeout))" in lines
    part = next(line for line in lines if line.startswith("  lift-2 "))
    assert part.split()[:4] == ["lift-2", "device", "retrying", "(demoted)"]
    assert part.endswith("no answer (timeout)")
    assert not any(line.startswith("  lift-1 ") for line in lines)  # ok parts are not listed
    assert "upstream  state retrying: sink down" in lines  # the upstream's health, sink included
    assert lines[-3].startswith("outbox    BLOCKED: disk below reserve; 0 undelivered")
