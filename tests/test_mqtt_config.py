"""MQTT source configuration: validation messages name the bad key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent import config as cfg
from agent.errors import ConfigError

BASE: dict[str, Any] = {
    "upstream": {"url": "https://upstream.example"},
}


def settings(source: dict[str, Any]) -> cfg.Settings:
    src = {"type": "mqtt", "host": "broker", "client_id": "gw-1"} | source
    return cfg.parse({**BASE, "sources": {"plant": src}})[0]


def problems(source: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as exc:
        settings(source)
    return dict(exc.value.problems)


SUB = {"topic": "a/{asset}", "points": [{"name": "v", "path": "v"}]}


def test_valid_minimal_config_and_filters() -> None:
    s = settings({"subscriptions": [SUB], "password": "pw"})
    src = s.sources["plant"]
    assert src.subscriptions[0].mqtt_filter == "a/+"
    assert src.subscriptions[0].names == ["asset"]
    assert src.session_expiry == 7 * 86400
    assert src.protocol == "5"
    assert "pw" not in repr(src)


@pytest.mark.parametrize(
    ("sub", "key", "fragment"),
    [
        ({"topic": "a/#/b"}, "sources.plant.subscriptions.0.topic", "'#' must be the last"),
        ({"topic": "a/b+"}, "sources.plant.subscriptions.0.topic", "whole level"),
        ({"topic": "a/{x}y"}, "sources.plant.subscriptions.0.topic", "named segment"),
        ({"qos": 2}, "sources.plant.subscriptions.0.qos", ""),
        ({"asset": "{nope}"}, "sources.plant.subscriptions.0", "unknown placeholder"),
        ({"points": []}, "sources.plant.subscriptions.0", "at least one"),
        ({"colour": "red"}, "sources.plant.subscriptions.0.colour", "unknown key"),
    ],
)
def test_bad_subscription_names_the_key(sub: dict[str, Any], key: str, fragment: str) -> None:
    got = problems({"subscriptions": [SUB | sub]})
    assert key in got, got
    assert fragment in got[key]


def test_missing_client_id_and_subscriptions() -> None:
    with pytest.raises(ConfigError) as exc:
        cfg.parse({**BASE, "sources": {"plant": {"type": "mqtt", "host": "h"}}})
    keys = dict(exc.value.problems)
    assert "sources.plant.client_id" in keys
    assert "sources.plant.subscriptions" in keys


def test_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    secret.chmod(0o600)
    src = settings({"subscriptions": [SUB], "password_file": str(secret)}).sources["plant"]
    assert src.password is not None
    assert src.password.get_secret_value() == "hunter2"


def test_example_config_mqtt_section_loads() -> None:
    root = Path(__file__).resolve().parents[1]
    s, _ = cfg.load(root / "config.example.toml")
    src = s.sources["plant-mqtt"]
    assert src.type == "mqtt"
    assert [sub.format for sub in src.subscriptions] == [
        "json",
        "json",
        "sparkplug_b",
        "json",
        "tag_scan",
        "inspection",
    ]
