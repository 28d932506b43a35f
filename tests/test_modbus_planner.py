"""Read planning: golden cases in tests/cases/modbus/<name>/, limits, gaps and splits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import config as cfg
from agent.sources import modbus
from agent.sources.modbus.config import DeviceConfig, ModbusConfig
from agent.sources.modbus.planner import minimum_requests, plan, split

CASES = Path(__file__).parent / "cases" / "modbus"
ROOT = Path(__file__).parent.parent


def explain_file(path: Path) -> str:
    settings, _ = cfg.load(path)
    return "\n".join(
        modbus.explain(conf) for conf in settings.sources.values() if conf.type == "modbus"
    )


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_golden_plans(case: str) -> None:
    expected = (CASES / case / "expected.txt").read_text().rstrip("\n")
    assert explain_file(CASES / case / "config.toml") == expected


def device(points: list[dict[str, object]], **extra: object) -> DeviceConfig:
    return DeviceConfig.model_validate({"connection": "c", "points": points, **extra})


def regs(n: int, type_: str = "uint16", width: int = 1, start: int = 0) -> list[dict[str, object]]:
    return [{"name": f"p{i}", "address": start + i * width, "type": type_} for i in range(n)]


def test_contiguous_map_reaches_the_lower_bound() -> None:
    dev = device(regs(100, "float32", 2))  # 200 registers: 2 requests at least
    requests = plan(dev)
    assert [(r.start, r.count) for r in requests] == [(0, 124), (124, 76)]
    assert len(requests) == minimum_requests(dev) == 2


def test_device_request_limit_is_respected() -> None:
    dev = device(regs(10), max_registers_per_request=4)
    assert [(r.start, r.count) for r in plan(dev)] == [(0, 4), (4, 4), (8, 2)]


def test_gap_rule() -> None:
    points = [{"name": "a", "address": 0}, {"name": "b", "address": 6}]
    assert len(plan(device(points, max_gap_registers=5))) == 1
    assert len(plan(device(points, max_gap_registers=4))) == 2
    assert len(plan(device(points, max_gap_registers=0))) == 2


def test_one_based_addresses_map_to_wire_addresses() -> None:
    dev = device([{"name": "a", "address": 40}], address_base=1)
    (request,) = plan(dev)
    assert request.start == 39
    with pytest.raises(ValueError, match="address below address_base"):
        device([{"name": "a", "address": 0}], address_base=1)


def test_split_drops_gaps_first_then_goes_per_range() -> None:
    dev = device(
        [
            {"name": "a", "address": 0, "type": "uint32"},
            {"name": "b", "address": 2},
            {"name": "c", "address": 2, "type": "bit", "bit": 1},
            {"name": "d", "address": 10},
        ]
    )
    (merged,) = plan(dev)
    first, second = split(merged)
    assert (first.start, first.count, second.start, second.count) == (0, 3, 10, 1)
    parts = split(first)
    assert [(r.start, r.count, [p.name for p in r.points]) for r in parts] == [
        (0, 2, ["a"]),
        (2, 1, ["b", "c"]),
    ]
    assert split(parts[1]) == []


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="use type 'bool'"):
        device([{"name": "a", "address": 0, "table": "coil", "type": "uint16"}])
    with pytest.raises(ValueError, match="duplicate point name"):
        device([{"name": "a", "address": 0}, {"name": "a", "address": 1}])
    with pytest.raises(ValueError, match="needs 'length'"):
        device([{"name": "a", "address": 0, "type": "string"}])
    with pytest.raises(ValueError, match="unknown connection"):
        ModbusConfig.model_validate(
            {
                "type": "modbus",
                "connections": {"x": {"host": "h"}},
                "devices": {"d": {"connection": "y"}},
            }
        )
    with pytest.raises(ValueError, match="needs 'serial_port'"):
        ModbusConfig.model_validate(
            {"type": "modbus", "connections": {"x": {"transport": "rtu"}}, "devices": {}}
        )


def test_check_config_explain_cli() -> None:
    config = CASES / "gaps_and_limits" / "config.toml"
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "--explain", str(config)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[sources.plant] (modbus)" in proc.stdout
    assert (CASES / "gaps_and_limits" / "expected.txt").read_text().strip() in proc.stdout


def test_example_config_modbus_section_loads_and_explains() -> None:
    text = explain_file(ROOT / "config.example.toml")
    assert "device energy-meter-1: unit 1 on gw-hall-a" in text
    assert "holding_register 100..119" in text  # lift-3 is 1-based: 101 -> wire 100
