"""Equipment profiles: shipped files, expansion into Modbus and MQTT points, overrides,
site profile directories, and config errors with key paths (also through check-config)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import config as cfg
from agent import profiles
from agent.errors import ConfigError
from agent.sources.modbus import config as modbus_config
from agent.sources.mqtt import config as mqtt_config

ROOT = Path(__file__).resolve().parents[1]

BASE = """
[agent]
id = "gw-1"
state_dir = "{state}"
{agent_extra}

[upstream]
url = "https://upstream.example"
token = "t"

[sources.lifts]
type = "modbus"

[sources.lifts.connections.gw]
host = "127.0.0.1"

[sources.lifts.devices.lift-1]
connection = "gw"
address_base = 1
asset = "LIFT-1"
profile = "{profile}"
{device_extra}
"""


def write_config(tmp_path: Path, profile: str = "lift_generic", **kw: str) -> Path:
    text = BASE.format(
        state=tmp_path / "state",
        profile=profile,
        agent_extra=kw.get("agent_extra", ""),
        device_extra=kw.get("device_extra", ""),
    )
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_every_shipped_profile_loads_and_maps_both_protocols() -> None:
    names = sorted(profiles.available())
    assert {"lift_generic", "escalator_generic", "lift_acme_mx3"} <= set(names)
    for name in names:
        profile = profiles.load(name)
        modbus = modbus_config.profile_points(name, 0)
        mqtt = mqtt_config.profile_points(name)
        assert len(modbus) == len(mqtt) == len(profile.points), name
        for point in modbus:
            if point.kind != "reading":
                assert point.codes, f"{name}.{point.name} has no code table"


def test_lift_profile_has_the_points_rules_need() -> None:
    names = {p.name for p in profiles.load("lift_generic").points}
    assert {
        "trips",
        "door_cycles",
        "door_faults",
        "speed",
        "position",
        "motor_temp",
        "out_of_service",
        "fault",
    } <= names


def test_vendor_profile_maps_its_codes_onto_the_normalized_ones() -> None:
    generic = profiles.load("lift_generic").codes["fault"]
    vendor = profiles.load("lift_acme_mx3")
    normalized = {c.code for c in generic.values()}
    assert {c.code for c in vendor.codes["fault"].values()} <= normalized
    fault = next(p for p in modbus_config.profile_points("lift_acme_mx3", 0) if p.name == "fault")
    assert fault.address == 20  # the vendor's register, not the generic one
    assert fault.codes["105"].code == "door_lock_fault"
    # Inherited points keep the generic layout.
    trips = next(p for p in modbus_config.profile_points("lift_acme_mx3", 0) if p.name == "trips")
    assert trips.address == 0


def test_device_profile_expands_with_address_base_and_overrides(tmp_path: Path) -> None:
    extra = """
[[sources.lifts.devices.lift-1.points]]
name = "motor_temp"
table = "holding_register"
address = 300
type = "float32"
unit = "degC"

[[sources.lifts.devices.lift-1.points]]
name = "load"
address = 301
"""
    settings, _ = cfg.load(write_config(tmp_path, device_extra=extra))
    device = settings.sources["lifts"].devices["lift-1"]
    points = {p.name: p for p in device.points}
    assert points["trips"].address == 1  # profile is 0-based, the device counts from 1
    assert points["motor_temp"].address == 300
    assert points["motor_temp"].type == "float32"
    assert "load" in points
    assert [p.name for p in device.points][-1] == "load"
    assert len(device.points) == len(profiles.load("lift_generic").points) + 1


def test_unknown_profile_is_a_config_error_with_its_key_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg.load(write_config(tmp_path, profile="lift_genric"))
    problems = dict(exc.value.problems)
    assert "sources.lifts.devices.lift-1.profile" in problems
    assert "unknown profile 'lift_genric'" in problems["sources.lifts.devices.lift-1.profile"]
    assert "lift_generic" in problems["sources.lifts.devices.lift-1.profile"]  # the choices


def _site_dir(tmp_path: Path, name: str, text: str) -> Path:
    folder = tmp_path / "profiles"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.toml").write_text(text)
    return folder


def test_site_profile_dir_adds_and_shadows_profiles(tmp_path: Path) -> None:
    folder = _site_dir(
        tmp_path,
        "lift_site",
        'name = "lift_site"\nextends = "lift_generic"\n'
        '[[points]]\nname = "car_load"\nunit = "kg"\n'
        'modbus = { table = "input_register", address = 40 }\n',
    )
    path = write_config(tmp_path, profile="lift_site", agent_extra=f'profile_dirs = ["{folder}"]')
    settings, _ = cfg.load(path)
    points = {p.name: p for p in settings.sources["lifts"].devices["lift-1"].points}
    assert points["car_load"].address == 41
    assert "fault" in points  # inherited


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            'name = "broken"\n[[points]]\nname = "x"\nmodbus = { address = -1 }\n',
            "points.0.modbus.address",
        ),
        (
            'name = "broken"\n[[points]]\nname = "x"\nkind = "fault"\ncodes = "nope"\n',
            "points.0.codes",
        ),
        ('name = "broken"\n[[points]]\nnam = "x"\n', "points.0.nam"),
        (
            'name = "broken"\n[[points]]\nname = "x"\nmodbu = { address = 1 }\n',
            "points.0.modbu: no source type reads profile points from 'modbu'",
        ),
        ('name = "broken"\n[[points\n', "invalid TOML"),
        ('name = "other"\n', "must be 'broken'"),
        ('name = "broken"\nextends = "broken"\n', "extends itself"),
    ],
)
def test_malformed_profile_file_is_reported_by_check_config(
    tmp_path: Path, text: str, where: str
) -> None:
    folder = _site_dir(tmp_path, "broken", text)
    path = write_config(tmp_path, agent_extra=f'profile_dirs = ["{folder}"]')
    with pytest.raises(ConfigError) as exc:
        cfg.load(path)
    problems = dict(exc.value.problems)
    assert "agent.profile_dirs" in problems, problems
    assert where in problems["agent.profile_dirs"]
    assert "broken.toml" in problems["agent.profile_dirs"]
    run = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", str(path)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2
    assert "agent.profile_dirs:" in run.stderr
    assert where in run.stderr


def test_mqtt_subscription_profile_errors_name_the_subscription(tmp_path: Path) -> None:
    text = f"""
[agent]
state_dir = "{tmp_path / "state"}"
[upstream]
url = "https://upstream.example"
token = "t"
[sources.feed]
type = "mqtt"
host = "127.0.0.1"
client_id = "x"
[[sources.feed.subscriptions]]
topic = "lifts/{{asset}}"
profile = "escalator_generik"
"""
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        cfg.load(path)
    assert "sources.feed.subscriptions.0.profile" in dict(exc.value.problems)
