"""CLI and local-API faults an operator meets (issue 18, items 5 and 7), on a real agent.

Each test drives the real agent (in-process, real local API on a free port) or the real
CLI entry point; none of them mocks the API or the outbox.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from agent import config as cfg
from agent import ctl
from agent.__main__ import build_parser, main
from agent.errors import ConfigError
from agent.outbox import Outbox
from tests.agent_harness import running_agent, settings_for
from tests.agent_process import base_config, cli, write_config
from tests.helpers.cmms import declarative_source, sqlite_cmms

TOKEN = "ops-api-token-77c1"


async def test_sync_of_an_unknown_entity_names_the_entity_not_the_source(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path,
        api={"token": TOKEN},
        sources={"cmms": declarative_source(sqlite_cmms(tmp_path / "c.db", rows=1))},
    )
    async with running_agent(settings) as agent:
        url = f"http://{settings.api.listen}"
        while agent.slots["cmms"].source is None:
            await asyncio.sleep(0.02)
        with pytest.raises(ctl.CtlError) as err:
            await asyncio.to_thread(ctl.request_sync, url, TOKEN, "cmms", ["nope"], False)
        assert err.value.code == ctl.EXIT_REFUSED
        message = str(err.value)
        assert "unknown entities ['nope']" in message, message
        assert "work_orders" in message, message  # what the source does have
        assert "no source named" not in message, message
        with pytest.raises(ctl.CtlError) as err:
            await asyncio.to_thread(ctl.request_sync, url, TOKEN, "nosuch", None, False)
        assert "no source named 'nosuch'" in str(err.value)
        answer = await asyncio.to_thread(
            ctl.request_sync, url, TOKEN, "cmms", ["work_orders"], False
        )
        assert answer["accepted"] == ["work_orders"]


def test_config_is_accepted_after_the_subcommand_as_before_it() -> None:
    parser = build_parser()
    for command in (["run"], ["check-config"], ["outbox", "stats"], ["status"], ["sync", "s"]):
        assert parser.parse_args([*command, "--config", "after.toml"]).config == "after.toml"
        assert parser.parse_args(["--config", "before.toml", *command]).config == "before.toml"
        assert parser.parse_args(command).config is None


def test_run_config_after_the_subcommand_reaches_the_config_loader(tmp_path: Path) -> None:
    # A config with an error: `run` must load exactly this file and refuse it (exit 2),
    # instead of argparse rejecting `--config` after `run`.
    conf = tmp_path / "broken.toml"
    conf.write_text('[upstream]\nurl = "https://up.invalid"\n[agent]\nid = 5\n')
    r = cli("run", "--config", str(conf))
    assert r.returncode == 2, r.stderr
    assert "agent.id" in r.stderr, r.stderr
    assert str(conf) in r.stderr, r.stderr
    assert "unrecognized arguments" not in r.stderr


def test_outbox_requeue_of_a_non_number_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"

    async def create() -> None:
        async with Outbox(db):
            pass

    asyncio.run(create())
    r = cli("outbox", "requeue", "abc", "--db", str(db))
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr, r.stderr
    assert "'abc' is not a dead-letter seq" in r.stderr, r.stderr


def test_outbox_stats_shows_the_configured_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = write_config(
        tmp_path / "config.toml", base_config(tmp_path, outbox={"max_bytes": "5MiB"})
    )
    settings, _ = cfg.load(conf)

    async def create() -> None:
        async with Outbox.from_config(settings.outbox, settings.agent.state_dir):
            pass

    asyncio.run(create())
    assert main(["--config", str(conf), "outbox", "stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_bytes"] == 5 * 2**20
    assert main(["--config", str(conf), "outbox", "stats"]) == 0
    assert "of 5,242,880 bytes" in capsys.readouterr().out
    # --db alone still reads the budget from the config
    db = str(settings.outbox_path())
    assert main(["--config", str(conf), "outbox", "stats", "--json", "--db", db]) == 0
    assert json.loads(capsys.readouterr().out)["max_bytes"] == 5 * 2**20


async def test_reload_says_what_applied_and_what_needs_a_restart(tmp_path: Path) -> None:
    data = base_config(tmp_path, api={"token": TOKEN})
    conf = write_config(tmp_path / "config.toml", data)
    settings, _ = cfg.load(conf)
    async with running_agent(settings, conf) as agent:
        changed = {
            **data,
            "logging": {**data["logging"], "level": "warning"},
            "outbox": {"max_bytes": "2GiB"},
        }
        write_config(conf, changed)
        assert await agent.reload()
        st = await agent.status()
        assert st["reload"]["ok"] is True
        assert st["reload"]["applied"] == ["logging.level"]
        assert st["reload"]["restart_needed"] == ["outbox.max_bytes"]
        assert st["restart_needed"] == ["outbox.max_bytes"]
        shown = ctl.render_status(st)
        assert "applied: logging.level; needs a restart: outbox.max_bytes" in shown, shown
        assert "RESTART NEEDED to apply: outbox.max_bytes" in shown, shown

        # The next reload changes nothing restart-worthy: the restart is still needed,
        # since the running outbox still has the old budget.
        write_config(conf, {**changed, "logging": data["logging"]})
        assert await agent.reload()
        st = await agent.status()
        assert st["reload"]["restart_needed"] == []
        assert st["restart_needed"] == ["outbox.max_bytes"]

        # Reverted: nothing waits for a restart any more.
        write_config(conf, data)
        assert await agent.reload()
        assert (await agent.status())["restart_needed"] == []
        assert "RESTART NEEDED" not in ctl.render_status(await agent.status())


def test_require_token_for_reads_needs_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        settings_for(tmp_path, api={"require_token_for_reads": True})
    assert any(
        key == "api" and "require_token_for_reads needs api.token" in msg
        for key, msg in err.value.problems
    ), err.value.problems


async def test_reads_need_the_token_when_required_except_healthz(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = base_config(tmp_path, api={"token": TOKEN, "require_token_for_reads": True})
    conf = write_config(tmp_path / "config.toml", data)
    settings, _ = cfg.load(conf)
    async with running_agent(settings, conf):
        base = f"http://{settings.api.listen}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/healthz")).status_code == 200
            for path in ("/readyz", "/v1/status", "/v1/sync-status", "/metrics"):
                r = await http.get(path)
                assert r.status_code == 401, (path, r.text)
                assert r.json()["error"]["code"] == "unauthorized"
                wrong = await http.get(path, headers={"Authorization": "Bearer nope"})
                assert wrong.status_code == 401, path
                ok = await http.get(path, headers=auth)
                assert ok.status_code in (200, 503), (path, ok.text)
        # `edge-agent status` sends the token from the config file.
        code = await asyncio.to_thread(main, ["--config", str(conf), "status", "--json"])
        assert code in (ctl.EXIT_OK, ctl.EXIT_REFUSED)
        assert json.loads(capsys.readouterr().out)["agent_id"] == "proc-agent"
        with pytest.raises(ctl.CtlError) as err:
            await asyncio.to_thread(ctl.fetch_status, base)
        assert err.value.code == ctl.EXIT_AUTH


async def test_reads_stay_open_by_default(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, api={"token": TOKEN})
    assert settings.api.require_token_for_reads is False
    base = f"http://{settings.api.listen}"
    async with running_agent(settings), httpx.AsyncClient(base_url=base) as http:
        for path in ("/healthz", "/v1/status", "/v1/sync-status", "/metrics"):
            assert (await http.get(path)).status_code == 200, path
