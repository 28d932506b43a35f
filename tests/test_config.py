"""Configuration: TOML, environment overrides, secret files, durations, error messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import config as cfg
from agent.configtypes import format_duration, parse_duration, parse_size
from agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = """
[agent]
id = "gw-1"
state_dir = "{state}"

[upstream]
url = "https://upstream.example"
token = "s3cr3t-token"
"""


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("{state}", str(tmp_path / "state")))
    return path


def problems(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return dict(exc.value.problems)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("1h30m", 5400),
        ("90d", 90 * 86400),
        ("250ms", 0.25),
        ("1.5h", 5400),
        (" 2w ", 14 * 86400),
        (45, 45),
    ],
)
def test_durations_parse(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["15 minutes", "", "m", "10x", "-5", -5, "1h 30", True, "1s2"])
def test_bad_durations_are_refused(text: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_sizes_parse() -> None:
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1GiB") == 2**30
    assert parse_size("10 MB") == 10_000_000
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError, match="invalid size 'lots'"):
        parse_size("lots")
    assert format_duration(5400) == "1h30m"


def test_minimal_file_loads_with_defaults(tmp_path: Path) -> None:
    settings, warnings = cfg.load(write(tmp_path, MINIMAL))
    assert warnings == []
    assert settings.agent.id == "gw-1"
    assert settings.outbox.max_bytes == 2**30
    assert settings.outbox.when_full == "block"
    assert settings.outbox_path() == tmp_path / "state" / "outbox.db"
    assert settings.api.listen == "127.0.0.1:8470"
    assert settings.upstream.tls_verify is True


def test_secret_never_appears_in_repr(tmp_path: Path) -> None:
    settings, _ = cfg.load(write(tmp_path, MINIMAL))
    assert "s3cr3t-token" not in repr(settings)
    assert "s3cr3t-token" not in str(settings.model_dump())


def test_every_problem_is_named_with_its_key_path(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + """
connect_timeout = "15 minutes"
colour = "blue"

[outbox]
max_bytes = "lots"
when_full = "drop"
"""
    )
    with pytest.raises(ConfigError) as exc:
        cfg.load(write(tmp_path, text))
    found = problems(exc)
    assert found["upstream.connect_timeout"].startswith("invalid duration '15 minutes'")
    assert found["upstream.colour"].startswith("unknown key")
    assert found["outbox.max_bytes"].startswith("invalid size 'lots'")
    assert "'drop'" in found["outbox.when_full"]
    assert len(found) == 4


def test_missing_upstream_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg.load(write(tmp_path, "[agent]\nid = 'x'\n"))
    assert problems(exc) == {"upstream": "required key is missing"}


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML.*line 2"):
        cfg.load(write(tmp_path, "[agent]\nid = \n"))


def test_token_file_is_read_and_loose_permissions_warn(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    secret.chmod(0o644)
    text = MINIMAL.replace('token = "s3cr3t-token"', f'token_file = "{secret}"')
    settings, warnings = cfg.load(write(tmp_path, text))
    assert settings.upstream.token is not None
    assert settings.upstream.token.get_secret_value() == "from-file"
    assert len(warnings) == 1
    assert "chmod 600" in warnings[0]
    secret.chmod(0o600)
    _, warnings = cfg.load(write(tmp_path, text))
    assert warnings == []


def test_token_and_token_file_together_is_an_error(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("x")
    text = MINIMAL + f'token_file = "{secret}"\n'
    with pytest.raises(ConfigError, match="set either 'token' or 'token_file'"):
        cfg.load(write(tmp_path, text))


def test_missing_secret_file_names_key_and_path(tmp_path: Path) -> None:
    text = MINIMAL.replace('token = "s3cr3t-token"', 'token_file = "/nonexistent/tok"')
    with pytest.raises(ConfigError) as exc:
        cfg.load(write(tmp_path, text))
    assert "cannot read secret file '/nonexistent/tok'" in problems(exc)["upstream.token_file"]


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_OUTBOX__MAX_BYTES", "64MiB")
    monkeypatch.setenv("EDGE_AGENT_UPSTREAM__URL", "https://override.example")
    settings, _ = cfg.load(write(tmp_path, MINIMAL))
    assert settings.outbox.max_bytes == 64 * 2**20
    assert settings.upstream.url == "https://override.example"
    assert settings.upstream.token is not None  # the rest of the section still comes from the file


def test_bad_environment_value_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_OUTBOX__READINGS_MAX_AGE", "a week")
    with pytest.raises(ConfigError) as exc:
        cfg.load(write(tmp_path, MINIMAL))
    assert "invalid duration 'a week'" in problems(exc)["outbox.readings_max_age"]


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_AGENT_CONFIG", raising=False)
    assert cfg.config_path(None) == Path("/etc/edge-agent/config.toml")
    monkeypatch.setenv("EDGE_AGENT_CONFIG", "/tmp/a.toml")
    assert cfg.config_path(None) == Path("/tmp/a.toml")
    assert cfg.config_path("/tmp/b.toml") == Path("/tmp/b.toml")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def test_check_config_cli_ok_and_errors(tmp_path: Path) -> None:
    good = run_cli("check-config", str(write(tmp_path, MINIMAL)))
    assert good.returncode == 0, good.stderr
    assert "OK" in good.stdout
    bad_text = MINIMAL + 'read_timeout = "15 minutes"\nbogus = 1\n'
    bad = run_cli("check-config", str(write(tmp_path, bad_text, "bad.toml")))
    assert bad.returncode == 2
    assert "upstream.read_timeout: invalid duration '15 minutes'" in bad.stderr
    assert "upstream.bogus: unknown key" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = run_cli("check-config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2
    assert "cannot read config file" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_example_config_is_valid() -> None:
    result = run_cli("check-config", str(ROOT / "config.example.toml"))
    assert result.returncode == 0, result.stderr
