"""agent.preflight: the machine checks of check-config (state directory, named files, what
the service user could read), on real files with real permission bits.

The service user is read from a unit and user database under a throw-away root, so the
tests never depend on (or change) this machine's users. The permission decision is made
from the bits, which is why it works the same when the tests run as root.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import config as cfg
from agent import preflight
from agent.__main__ import main
from agent.errors import ConfigError
from tests.agent_process import base_config, cli, write_config

ROOT = Path(__file__).resolve().parents[1]


def fake_root(tmp: Path, *, service: str | None = None, dropin: str | None = None) -> Path:
    root = tmp / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\n"
        "edge-agent:x:990:990:edge-agent service:/var/lib/edge-agent:/usr/sbin/nologin\n"
        "alice:x:1000:1000::/home/alice:/bin/sh\n"
    )
    (root / "etc/group").write_text(
        "root:x:0:\nedge-agent:x:990:\nalice:x:1000:\nops:x:1200:alice\n"
    )
    unit_dir = root / "lib/systemd/system"
    unit_dir.mkdir(parents=True)
    unit = service or (ROOT / "systemd/edge-agent.service").read_text()
    (unit_dir / "edge-agent.service").write_text(unit)
    if dropin is not None:
        d = root / "etc/systemd/system/edge-agent.service.d"
        d.mkdir(parents=True)
        (d / "local.conf").write_text(dropin)
    return root


def test_the_shipped_unit_gives_the_service_view(tmp_path: Path) -> None:
    view = preflight.ServiceView.from_system(fake_root(tmp_path))
    assert view is not None
    assert (view.user, view.uid, view.gids) == ("edge-agent", 990, {990})
    assert view.protect_home
    assert view.private_tmp
    assert view.protect_system_strict
    assert view.writable == [Path("/var/lib/edge-agent")]


def test_no_unit_no_view(tmp_path: Path) -> None:
    assert preflight.ServiceView.from_system(tmp_path) is None


def test_dropins_add_groups_and_writable_paths(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path, dropin="[Service]\nSupplementaryGroups=ops\nReadWritePaths=/srv/agent\n"
    )
    view = preflight.ServiceView.from_system(root)
    assert view is not None
    assert view.gids == {990, 1200}
    assert Path("/srv/agent") in view.writable


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path sits below a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="edge-agent-preflight-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_read_permission_follows_owner_group_other_and_every_parent(open_dir: Path) -> None:
    tmp_path = open_dir
    view = preflight.ServiceView("edge-agent", 990, {990}, tmp_path / "unit")
    secret = tmp_path / "d" / "token"
    secret.parent.mkdir()
    secret.write_text("x")
    os.chmod(secret.parent, 0o755)
    os.chmod(secret, 0o600)  # owned by the test's user, not uid 990
    assert not view.may(secret, os.R_OK)
    os.chmod(secret, 0o604)
    assert view.may(secret, os.R_OK)  # others may read
    os.chmod(secret.parent, 0o750)  # ... but cannot enter the directory
    assert not view.may(secret, os.R_OK)
    os.chmod(secret.parent, 0o755)
    if os.getuid() == 0:  # only root may give the file to group 990
        os.chown(secret, 0, 990)
        os.chmod(secret, 0o640)
        assert view.may(secret, os.R_OK)  # its group may read
    dynamic = preflight.ServiceView("(dynamic user)", None, set(), tmp_path / "unit")
    os.chmod(secret, 0o640)
    assert not dynamic.may(secret, os.R_OK)


def test_check_config_warns_what_the_service_user_cannot_read(
    tmp_path: Path, open_dir: Path
) -> None:
    token = open_dir / "srv" / "upstream.token"
    token.parent.mkdir()
    token.write_text("secret-token\n")
    os.chmod(token.parent, 0o755)
    os.chmod(token, 0o600)
    data = base_config(tmp_path)
    data["upstream"] = {"url": "https://up.example", "token_file": str(token)}
    data["agent"]["state_dir"] = "/srv/edge-agent"
    conf = write_config(tmp_path / "config.toml", data)
    os.chmod(conf, 0o600)
    settings, _ = cfg.load(conf)
    view = preflight.ServiceView.from_system(fake_root(tmp_path))
    assert view is not None
    hidden = preflight.service_warnings(settings, conf, view)
    assert any(f"{str(token)!r} is invisible to the service: PrivateTmp" in w for w in hidden)
    # The test's files are under /var/tmp, which PrivateTmp hides: without it the
    # permission bits decide.
    view.private_tmp = False
    warnings = preflight.service_warnings(settings, conf, view)
    text = "\n".join(warnings)
    assert (
        f"upstream.token_file: the service user edge-agent (uid 990) cannot read {str(token)!r}"
        in text
    )
    assert "chgrp edge-agent" in text
    assert "agent.state_dir: '/srv/edge-agent' is outside the unit's writable paths" in text
    # The config sits below pytest's 0700 base directory: not readable either.
    assert f"(config file): the service user edge-agent (uid 990) cannot read {str(conf)!r}" in text


def test_files_under_tmp_and_home_are_invisible_to_the_sandboxed_service(tmp_path: Path) -> None:
    view = preflight.ServiceView.from_system(fake_root(tmp_path))
    assert view is not None
    assert "PrivateTmp" in (view.hidden(Path("/tmp/ca.pem")) or "")
    assert "ProtectHome" in (view.hidden(Path("/root/ca.pem")) or "")
    assert view.hidden(Path("/etc/edge-agent/ca.pem")) is None


def test_run_refuses_an_unusable_state_dir_with_one_line(tmp_path: Path) -> None:
    data = base_config(tmp_path)
    data["agent"]["state_dir"] = "/etc/hostname/state"
    conf = write_config(tmp_path / "config.toml", data)
    r = cli("run", config=conf)
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr
    assert "agent.state_dir: state directory '/etc/hostname/state' cannot be created" in r.stderr


def test_start_problems_of_a_disabled_source_are_warnings(tmp_path: Path) -> None:
    data = base_config(tmp_path)
    data["sources"] = {
        "cmms": {
            "type": "sql",
            "enabled": False,
            "profile": "declarative",
            "url": f"sqlite+aiosqlite:///{tmp_path}/missing.db?mode=ro",
            "entities": {
                "wo": {"entity_type": "work_order", "table": "wo", "key": ["k"], "cursor": "c"}
            },
        }
    }
    _, warnings = cfg.parse(data, checks=[preflight.start_problems])
    assert any("sources.cmms.url" in w and "does not exist" in w for w in warnings), warnings
    data["sources"]["cmms"]["enabled"] = True
    with pytest.raises(ConfigError) as err:
        cfg.parse(data, checks=[preflight.start_problems])
    assert err.value.problems[0][0] == "sources.cmms.url"


def test_check_config_without_a_unit_says_the_service_check_was_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if preflight.ServiceView.from_system() is not None:
        pytest.skip("an edge-agent unit is installed on this machine")
    conf = write_config(tmp_path / "config.toml", base_config(tmp_path))
    assert main(["check-config", str(conf)]) == 0
    assert "not checked whether the service user can read" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "state", ignore_errors=True)


def test_a_secret_readable_by_the_service_group_only_draws_no_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import grp  # noqa: PLC0415

    from agent import configtypes  # noqa: PLC0415

    secret = tmp_path / "upstream.token"
    secret.write_text("t0ken\n")
    # Stand-in for the edge-agent group: the group this test's files get.
    monkeypatch.setattr(configtypes, "SERVICE_GROUP", grp.getgrgid(secret.stat().st_gid).gr_name)
    data = {"upstream": {"url": "https://up.example", "token_file": str(secret)}}
    secret.chmod(0o640)  # root:edge-agent 0640, as docs/operations.md says
    assert cfg.parse(data)[1] == []
    secret.chmod(0o644)  # others too
    assert any("readable by group or others" in w for w in cfg.parse(data)[1])
    monkeypatch.setattr(configtypes, "SERVICE_GROUP", "no-such-group-here")
    secret.chmod(0o640)  # some other group
    assert any("chmod 600" in w for w in cfg.parse(data)[1])


def test_service_warnings_skip_files_a_disabled_source_lacks(tmp_path: Path) -> None:
    data = base_config(tmp_path)
    data["sources"] = {
        "cmms": {
            "type": "sql",
            "enabled": False,
            "profile": "declarative",
            "url": "sqlite+aiosqlite:////nonexistent/cmms.db?mode=ro",
            "entities": {
                "wo": {"entity_type": "work_order", "table": "wo", "key": ["k"], "cursor": "c"}
            },
        }
    }
    settings, _ = cfg.parse(data, checks=[preflight.start_problems])
    view = preflight.ServiceView.from_system(fake_root(tmp_path))
    assert view is not None
    warnings = preflight.service_warnings(settings, None, view)  # no traceback
    assert not any("nonexistent" in w for w in warnings), warnings
