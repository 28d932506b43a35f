"""The [upstream] section: config.example.toml documents every option and loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent import config as cfg
from agent.errors import ConfigError
from agent.sinks.http import HttpConfig

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def test_example_documents_every_upstream_option() -> None:
    text = EXAMPLE.read_text()
    section = re.split(r"^\[upstream\]$", text, flags=re.M)[1].split("\n[", 1)[0]
    for name in HttpConfig.model_fields:
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


def test_upstream_union_tells_sinks_apart_by_type_defaulting_to_http() -> None:
    """With a second sink type registered, ``[upstream]`` is a union on ``type``; a table
    without ``type`` is still the HTTP sink's (every config written before)."""
    from typing import Literal  # noqa: PLC0415

    from pydantic import TypeAdapter  # noqa: PLC0415

    from agent.sinks.base import UpstreamConfig  # noqa: PLC0415

    class OtherConfig(UpstreamConfig):
        type: Literal["other"] = "other"
        servers: list[str]

    union = TypeAdapter(cfg.upstream_union([HttpConfig, OtherConfig]))
    assert isinstance(union.validate_python({"url": "https://u.example"}), HttpConfig)
    other = union.validate_python({"type": "other", "servers": ["a"], "concurrency": 2})
    assert isinstance(other, OtherConfig)
    assert other.concurrency == 2
    with pytest.raises(ValueError, match="servers"):
        union.validate_python({"type": "other"})
