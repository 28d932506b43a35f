"""The systemd unit: ``systemd-analyze verify`` and ``security --offline``, and the
hardening it relies on (MemoryDenyWriteExecute) checked against the real agent."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent_process import (
    ModbusServerThread,
    base_config,
    modbus_source,
    source_records,
    write_config,
)
from tests.helpers.agentproc import AgentProcess, wait_for

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "edge-agent.service"
SERIAL_DROPIN = ROOT / "systemd" / "edge-agent.service.d" / "serial-port.conf.example"
PREFIX = "/opt/edge-agent/"
MAX_EXPOSURE = 2.0  # systemd-analyze's scale: 0 (locked down) .. 10 (unprotected)


def systemd_analyze() -> str:
    """The tool's path; installs Debian's systemd package when missing (root with apt)."""
    found = shutil.which("systemd-analyze")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("systemd-analyze missing and apt-get unusable (not root): cannot verify")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "systemd"], check=True, env=env, capture_output=True
    )
    found = shutil.which("systemd-analyze")
    assert found, "installed Debian's systemd package, still no systemd-analyze"
    return found


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def with_stub_prefix(tmp_path: Path, *parts: Path) -> Path:
    """The unit (plus drop-ins) with /opt/edge-agent/ pointing at a stub executable, so
    that verify checks everything but the binary, which the package test checks."""
    (tmp_path / "bin").mkdir()
    stub = tmp_path / "bin" / "edge-agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = "\n".join(p.read_text() for p in parts)
    unit = tmp_path / "edge-agent.service"
    unit.write_text(text.replace(PREFIX, f"{tmp_path}/"))
    return unit


def test_unit_verifies(tmp_path: Path) -> None:
    tool = systemd_analyze()
    unit = with_stub_prefix(tmp_path, UNIT)
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr
    # The real file: the only complaint allowed is the not-yet-installed binary.
    r = subprocess.run([tool, "verify", str(UNIT)], capture_output=True, text=True)
    other = [
        line
        for line in r.stderr.splitlines()
        if line.strip() and f"{PREFIX}bin/edge-agent is not executable" not in line
    ]
    assert other == [], r.stderr


def test_serial_port_dropin_verifies(tmp_path: Path) -> None:
    tool = systemd_analyze()
    unit = with_stub_prefix(tmp_path, UNIT, SERIAL_DROPIN)
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = directives(SERIAL_DROPIN.read_text())
    assert d["PrivateDevices"] == ["no"]
    assert d["SupplementaryGroups"] == ["dialout"]
    assert d["DeviceAllow"] == ["/dev/ttyUSB0 rw"]


def exposure(tool: str, unit: Path) -> tuple[float, str]:
    r = subprocess.run(
        [tool, "security", "--offline=true", str(unit)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout
    return float(m.group(1)), r.stdout


def test_security_exposure_is_low() -> None:
    tool = systemd_analyze()
    score, report = exposure(tool, UNIT)
    print(f"systemd-analyze security exposure: {score}")
    assert score <= MAX_EXPOSURE, report
    passed = {line.split()[1] for line in report.splitlines() if line.startswith("✓")}
    for setting in (
        "NoNewPrivileges=",
        "PrivateDevices=",
        "PrivateTmp=",
        "ProtectSystem=",
        "MemoryDenyWriteExecute=",
        "SystemCallFilter=~@privileged",
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "User=/DynamicUser=",
    ):
        assert setting in passed, f"{setting} not satisfied:\n{report}"


def test_unit_lifecycle_settings() -> None:
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["Restart"] == ["on-failure"]
    assert d["RestartPreventExitStatus"] == ["2"]  # what `run` exits with on a bad config
    assert d["User"] == ["edge-agent"]
    assert d["StateDirectory"] == ["edge-agent"]
    assert int(d["WatchdogSec"][0]) >= 10
    assert d["CapabilityBoundingSet"] == [""]
    assert d["ExecStart"] == [f"{PREFIX}bin/edge-agent --config /etc/edge-agent/config.toml run"]


PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def refuse_wx_memory() -> None:
    """In the child: what MemoryDenyWriteExecute=yes enforces, via the kernel's MDWE."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def mdwe_supported() -> bool:
    r = subprocess.run(
        [sys.executable, "-c", "import mmap; mmap.mmap(-1, 4096, prot=7)"],
        preexec_fn=refuse_wx_memory,
        capture_output=True,
    )
    return r.returncode != 0 and b"Permission denied" in r.stderr


@pytest.mark.slow
async def test_agent_runs_under_memory_deny_write_execute(tmp_path: Path) -> None:
    try:
        supported = mdwe_supported()
    except OSError as exc:
        pytest.skip(f"kernel has no PR_SET_MDWE (Linux >= 6.3 needed): {exc}")
    assert supported, "PR_SET_MDWE accepted but W+X memory still allowed"
    with ModbusServerThread() as server:
        conf = write_config(
            tmp_path / "c.toml", base_config(tmp_path, sources={"m": modbus_source(server.port)})
        )
        agent = AgentProcess(conf, tmp_path / "agent.log")
        agent.start(preexec_fn=refuse_wx_memory)
        try:
            await agent.wait_ready()

            async def polled() -> bool:
                st = await agent.status()
                return source_records(st, "m") >= 2

            await wait_for(polled, what="records under MDWE", agent=agent)
            assert (await agent.get("/metrics")).status_code == 200
        finally:
            agent.kill()
