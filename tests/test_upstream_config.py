"""The [upstream] section: config.example.toml documents every option and loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent import config as cfg
from agent.errors import ConfigError
from agent.sinks.http import UpstreamConfig

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def test_example_documents_every_upstream_option() -> None:
    text = EXAMPLE.read_text()
    section = re.split(r"^\[upstream\]$", text, flags=re.M)[1].split("\n[", 1)[0]
    for name in UpstreamConfig.model_fields:
        assert re.search(rf"^#? ?{name} = ", section, re.M), f"{name} is not in the example"


def test_example_loads() -> None:
    settings, _ = cfg.load(EXAMPLE)
    assert settings.upstream.concurrency == 1
    assert settings.upstream.backoff_cap == 300.0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("url", "ftp://x", "invalid upstream url"),
        ("url", "not a url", "invalid upstream url"),
        ("concurrency", 0, "must be at least 1"),
        ("gzip_min_bytes", "lots", "invalid size"),
        ("read_timeout", "soon", "invalid duration"),
        ("colour", "blue", "unknown key"),
    ],
)
def test_bad_upstream_values_name_their_key(key: str, value: object, message: str) -> None:
    data = {"upstream": {"url": "https://u.example", key: value}}
    with pytest.raises(ConfigError) as err:
        cfg.parse(data)
    assert err.value.problems[0][0] == f"upstream.{key}"
    assert message in err.value.problems[0][1]


def test_token_is_never_shown() -> None:
    settings, _ = cfg.parse({"upstream": {"url": "https://u.example", "token": "hunter2"}})
    assert "hunter2" not in repr(settings.upstream)


def test_unreadable_tls_files_are_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError) as err:
        cfg.parse({"upstream": {"url": "https://u.example", "ca_file": str(bad)}})
    assert "cannot load the TLS files" in str(err.value)
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError) as err:
        cfg.parse({"upstream": {"url": "https://u.example", "client_cert_file": missing}})
    assert err.value.problems == [
        ("upstream.client_cert_file", f"file {missing!r} does not exist")
    ], err.value.problems
