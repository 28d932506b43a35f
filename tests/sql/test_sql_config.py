"""The SQL source's configuration: example file, key paths of mistakes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import config as cfg
from agent.errors import ConfigError
from agent.sources.sql.config import PROFILE_ENTITIES, SqlSourceConfig
from agent.sources.sql.engine import Database
from agent.sources.sql.profiles import sap_ecc

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_loads():
    settings, _ = cfg.load(ROOT / "config.example.toml")
    assert settings.sources["sap-prd"].profile == "sap_ecc"
    out = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "config.example.toml"],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr


def _parse(source: dict[str, object]) -> ConfigError:
    data = {"upstream": {"url": "https://x.invalid"}, "sources": {"db": source}}
    with pytest.raises(ConfigError) as err:
        cfg.parse(data)
    return err.value


def test_mistakes_name_their_key():
    base = {"type": "sql", "profile": "sap_ecc", "url": "postgresql+asyncpg://u@h/db"}
    assert _parse({**base, "intervall": "5m"}).problems[0][0] == "sources.db.intervall"
    assert _parse({**base, "timezone": "Mars/Olympus"}).problems[0][0] == "sources.db.timezone"
    err = _parse({**base, "include": ["work_order"]})
    assert "unknown entities ['work_order']" in str(err)
    err = _parse({**base, "profile": "declarative"})
    assert "needs at least one" in str(err)


def test_profile_entity_lists_match_the_profiles():
    config = SqlSourceConfig.model_validate(
        {"type": "sql", "profile": "sap_ecc", "url": "postgresql+asyncpg://u@h/db"}
    )
    names = tuple(s.name for s in sap_ecc.specs(config, Database(config)))
    assert names == PROFILE_ENTITIES["sap_ecc"]
