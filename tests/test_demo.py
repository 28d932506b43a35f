"""The README's first command: the demo runs the whole job and loses nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def demo_processes(marker: str) -> list[str]:
    """Command lines of live processes that belong to a demo directory."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmd:
            found.append(cmd)
    return found


def diagnostics(result: subprocess.CompletedProcess[str], directory: Path) -> str:
    """What to look at when the demo reports a loss: its output and the agent's log."""
    out = f"{result.stderr[-3000:]}\n{result.stdout[-2000:]}"
    for name in ("agent.log", "mosquitto.log"):
        log = directory / name
        tail = log.read_text(errors="replace")[-6000:] if log.exists() else f"(no {name})"
        out += f"\n---- {log} (tail) ----\n{tail}"
    return out


@pytest.mark.slow
def test_demo_with_an_outage_delivers_every_record_and_leaves_nothing_behind() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "demo",
            "--duration",
            "25s",
            "--outage",
            "6s",
            "--json",
            "--no-show-config",
            "--keep",  # its logs explain a failure; removed below either way
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    directory = Path(result.stderr.split("demo directory: ", 1)[-1].split()[0])
    try:
        assert result.returncode == 0, diagnostics(result, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True
    assert summary["lost"] == 0
    assert summary["missing"] == {"mqtt": 0, "cmms": 0, "modbus": 0}
    for source in ("lift-modbus", "iot-mqtt", "cmms"):
        assert sum(summary["delivered"][source].values()) > 0, source
    assert summary["delivered"]["cmms"]["work_order"] > 0
    assert summary["delivered"]["cmms"]["asset"] > 0
    assert summary["produced"]["mqtt_records_expected"] > 50
    # the malformed feed messages were quarantined, not delivered and not lost
    assert summary["quarantined"]["iot-mqtt"] == summary["produced"]["mqtt_malformed"] > 0
    assert "upstream outage" in result.stderr
    assert not demo_processes("edge-agent-demo-"), "the demo left processes behind"
