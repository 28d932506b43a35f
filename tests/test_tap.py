"""``edge-agent tap`` (issue 18, item 4) against real peers: a private mosquitto, SQLite and
PostgreSQL databases, a pymodbus server.

Each test checks what the tap shows AND what it leaves alone: the outbox file (byte for
byte, or not created), the SQL watermark, and the MQTT service's persistent session (its
queued messages still reach the service afterwards; a running service is not kicked off).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from sqlalchemy import text

from agent import config as cfg
from agent import tap as tap_cli
from agent.__main__ import build_parser, main
from agent.errors import TransientError
from agent.outbox import Outbox, Quarantined
from agent.records import Record
from agent.sources import source_plugin
from agent.sources.base import SourceConfig, SourceContext, Tapped, TapRequest
from agent.sources.modbus import ModbusConfig, ModbusSource
from agent.sources.mqtt.tap import tap_client_id
from agent.sources.sql import SqlSource, SqlSourceConfig
from tests.agent_process import base_config, cli, write_config
from tests.helpers.cmms import declarative_source, sqlite_cmms
from tests.helpers.mosquitto import Mosquitto, Tls, have_mosquitto
from tests.helpers.mqttpub import Publisher
from tests.helpers.outputs import TestOutput
from tests.helpers.waiting import free_port
from tests.helpers.waiting import wait_for as until
from tests.modbus_sim import running as modbus_running
from tests.modbus_sim import sim_device, start_server
from tests.mqtt_support import mqtt_config, records, running
from tests.sql.conftest import Backend, _postgres

CONTEXT = SourceContext(agent_id="gw-1", site="site-default")
TELEMETRY = "site/s1/lift/{asset}/telemetry"


def digest(*files: Path) -> list[str | None]:
    """The bytes of each file (None when absent), hashed: unchanged means untouched."""
    return [hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else None for f in files]


def outbox_files(db: Path) -> list[Path]:
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


async def tapped(name: str, conf: SourceConfig, request: TapRequest) -> AsyncIterator[Tapped]:
    """The items of the plugin's declared tap (what the CLI runs)."""
    tap = source_plugin(conf.type).tap
    assert tap is not None
    async for item in tap(name, conf, CONTEXT, request):
        yield item


def telemetry(asset: str, kg: float, ts: int = 1_760_000_000) -> bytes:
    return json.dumps({"ts": ts, "load": {"kg": kg}}).encode()


# ---------------------------------------------------------------------- MQTT


async def test_mqtt_tap_beside_the_running_service(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """Retained and live messages and a bad one, while the service runs on the same
    broker under its client id: the service is not kicked off and still gets every
    message; the tap's bad input carries its reason."""
    conf = mqtt_config(mosquitto.port, client_id="gw-service")
    async with Outbox(tmp_path / "outbox.db") as box, running(conf, box, "lifts") as service:
        with Publisher(mosquitto.port) as pub:
            pub.publish(TELEMETRY.format(asset="L1"), telemetry("L1", 5.0), retain=True)
            await until(lambda: service.counters["committed_messages"] >= 1, what="service")
            items = tapped("lifts", conf, TapRequest(limit=3, timeout=30))
            first = await anext(items)  # the retained one: the tap has subscribed
            pub.publish(TELEMETRY.format(asset="L2"), telemetry("L2", 7.5))
            pub.publish(TELEMETRY.format(asset="L3"), b"{not json")
            rest = [item async for item in items]
        await until(lambda: service.counters["committed_messages"] >= 3, what="service got all")
        assert service.counters["connects"] == 1, service.status()
        assert not service.status()["client_id_clash_suspected"]
        stored = await records(box)
    assert isinstance(first, Record)
    assert (first.remote_id, first.data["value"]) == ("L1/load", 5.0)
    assert first.source.name == "lifts"
    good = [i for i in rest if isinstance(i, Record)]
    bad = [i for i in rest if isinstance(i, Quarantined)]
    assert [(r.remote_id, r.data["value"]) for r in good] == [("L2/load", 7.5)]
    assert len(bad) == 1, rest
    assert bad[0].reason == "invalid_json", bad[0]
    assert bad[0].context["topic"] == TELEMETRY.format(asset="L3")
    # the service stored the same records the tap showed (same ids: same mapping)
    assert {r["id"] for r in stored} >= {first.id, good[0].id}


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_mqtt_tap_leaves_the_service_session_queue(
    mosquitto: Mosquitto, tmp_path: Path, protocol: str
) -> None:
    """Messages queued for the stopped service's persistent session are not taken by
    the tap: the service gets them when it comes back. The outbox is not touched."""
    conf = mqtt_config(mosquitto.port, client_id="gw-queue", protocol=protocol)
    db = tmp_path / "outbox.db"
    async with Outbox(db) as box, running(conf, box, "lifts"):
        pass  # creates the service's session (and its subscription) on the broker
    with Publisher(mosquitto.port) as pub:
        for i in range(3):
            pub.publish(TELEMETRY.format(asset=f"Q{i}"), telemetry(f"Q{i}", i))
        pub.publish(TELEMETRY.format(asset="R"), telemetry("R", 1.0), retain=True)
    before = digest(*outbox_files(db))
    items = [i async for i in tapped("lifts", conf, TapRequest(limit=1, timeout=30))]
    assert [i.remote_id for i in items if isinstance(i, Record)] == ["R/load"]
    assert digest(*outbox_files(db)) == before
    async with Outbox(db) as box, running(conf, box, "lifts") as service:
        await until(lambda: service.counters["committed_messages"] >= 4, what="queued ones")
        assert service.session_present is True
        got = {r["remote_id"] for r in await records(box)}
    assert {"Q0/load", "Q1/load", "Q2/load"} <= got


async def test_mqtt_tap_says_when_nothing_came(mosquitto: Mosquitto) -> None:
    conf = mqtt_config(mosquitto.port)
    items = [i async for i in tapped("lifts", conf, TapRequest(limit=5, timeout=0.3))]
    assert items == []
    line = tap_cli.summary("lifts", (0, 0), TapRequest(timeout=0.3), waited=0.31)
    assert "stopped after --timeout 0.3s" in line
    assert "nothing came" in line


def test_tap_client_id_is_never_the_services() -> None:
    assert tap_client_id("gw1", pid=42) == "gw1-tap-42"
    long = tap_client_id("x" * 128, pid=42)
    assert len(long) == 128
    assert long.endswith("-tap-42")


def mqtt_cli_config(tmp_path: Path, port: int, **over: Any) -> Path:
    source = {
        "type": "mqtt",
        "host": "127.0.0.1",
        "port": port,
        "client_id": "gw-cli",
        "subscriptions": [
            {
                "topic": "site/{site}/lift/{asset}/telemetry",
                "asset": "{asset}",
                "points": [{"name": "load", "path": "load.kg", "type": "float"}],
            }
        ],
        **over,
    }
    data = base_config(tmp_path, sources={"lifts": source})
    return write_config(tmp_path / "agent.toml", data)


def test_mqtt_tap_cli_json_lines_and_exit_codes(mosquitto: Mosquitto, tmp_path: Path) -> None:
    with Publisher(mosquitto.port) as pub:
        pub.publish("site/s1/lift/L9/telemetry", telemetry("L9", 3.0), retain=True)
    conf = mqtt_cli_config(tmp_path, mosquitto.port)
    r = cli("tap", "lifts", "--json", "--limit", "1", config=conf)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    envelope = json.loads(line)
    assert envelope["remote_id"] == "L9/load"
    assert envelope["data"]["value"] == 3.0
    assert envelope["source"] == {"name": "lifts", "system": "mqtt", "site": "test-site"}
    assert "nothing was written" in r.stderr
    assert not (tmp_path / "state").exists()  # no state dir, no outbox created

    r = cli("tap", "lifts", "--entity", "x", config=conf)
    assert r.returncode == 2, r.stderr
    assert "no entities" in r.stderr

    dead = mqtt_cli_config(tmp_path, free_port())
    r = cli("tap", "lifts", "--timeout", "2s", config=dead)
    assert r.returncode == 1, r.stderr
    assert "cannot read from broker 127.0.0.1" in r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------- SQL


def sqlite_agent(tmp_path: Path, db: Path, rows: int) -> tuple[Path, dict[str, Any]]:
    source = declarative_source(sqlite_cmms(db, rows=rows))
    data = base_config(tmp_path, sources={"cmms": source})
    return write_config(tmp_path / "agent.toml", data), source


def test_sql_tap_cli_shows_the_first_rows_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf, _ = sqlite_agent(tmp_path, tmp_path / "cmms.db", rows=5)
    assert main(["--config", str(conf), "tap", "cmms", "--limit", "3"]) == 0
    out = capsys.readouterr()
    assert [line.split()[-1] for line in out.out.splitlines() if line.startswith("#")] == [
        "WO-0", "WO-1", "WO-2",
    ]  # fmt: skip
    assert "data.title" in out.out
    assert "(provisional)" in out.out  # a work order's id is chained by the outbox
    assert "job 1" in out.out
    assert "tap cmms: 3 record(s), 0 bad input(s)" in out.err
    assert not (tmp_path / "state").exists()

    assert main(["--config", str(conf), "tap", "cmms", "--entity", "assets"]) == 2
    assert "no entity 'assets' (it has: work_orders)" in capsys.readouterr().err
    assert main(["--config", str(conf), "tap", "nosuch"]) == 2
    assert "no source named 'nosuch' (configured: cmms)" in capsys.readouterr().err


async def test_sql_tap_moves_no_watermark_and_leaves_the_outbox(tmp_path: Path) -> None:
    """After a sync committed a watermark, the tap still shows the first rows (a first
    sync's), and the outbox file is byte for byte what it was."""
    url = sqlite_cmms(tmp_path / "cmms.db", rows=4)
    conf = SqlSourceConfig.model_validate(declarative_source(url))
    db = tmp_path / "outbox.db"
    async with Outbox(db) as box:
        source = SqlSource("cmms", conf, CONTEXT)
        await source.sync_once(box)
        await source.aclose()
        mark = await box.cursor("cmms", "watermark:work_orders")
    assert mark is not None
    before = digest(*outbox_files(db))
    items = [i async for i in tapped("cmms", conf, TapRequest(limit=2))]
    assert [i.remote_id for i in items if isinstance(i, Record)] == ["WO-0", "WO-1"]
    assert digest(*outbox_files(db)) == before
    async with Outbox(db) as box:
        assert await box.cursor("cmms", "watermark:work_orders") == mark


def test_sql_tap_of_a_missing_column_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = declarative_source(sqlite_cmms(tmp_path / "cmms.db", rows=1))
    source["entities"]["work_orders"]["fields"]["status"] = "wostatus"
    conf = write_config(tmp_path / "agent.toml", base_config(tmp_path, sources={"cmms": source}))
    assert main(["--config", str(conf), "tap", "cmms"]) == 2
    err = capsys.readouterr().err
    assert "wostatus" in err, err
    assert "work_orders" in err, err


@pytest.fixture
async def pg() -> AsyncIterator[Backend]:
    """A private schema on the shared PostgreSQL (tests/sql/conftest.py)."""
    async with contextlib.asynccontextmanager(_postgres)() as backend:
        yield backend


async def test_sql_tap_on_postgresql_with_a_bad_row(pg: Backend) -> None:
    """Mapped rows in watermark order; a row whose value cannot be sent (a range)
    is shown as a bad input with its reason, and the rows after it still come."""
    async with pg.engine.begin() as conn:
        await conn.execute(
            text(
                f'CREATE TABLE "{pg.schema}".workorders (wonum text PRIMARY KEY, '
                "description text, status text, estimate int4range, changed_at timestamp)"
            )
        )
        await conn.execute(
            text(
                f'INSERT INTO "{pg.schema}".workorders VALUES '
                "('WO-7', 'Replace door motor', 'released', NULL, '2026-11-20 08:00'), "
                "('WO-8', 'Odd estimate', 'released', '[2,5)', '2026-11-20 09:00'), "
                "('WO-9', 'Lubricate', 'done', NULL, '2026-11-21 09:00')"
            )
        )
    conf = SqlSourceConfig.model_validate(
        {
            "type": "sql",
            "profile": "declarative",
            "url": pg.url,
            "initial_window": "3650d",
            "entities": {
                "work_orders": {
                    "entity_type": "work_order",
                    "table": f"{pg.schema}.workorders",
                    "key": ["wonum"],
                    "cursor": "changed_at",
                    "fields": {"title": "description", "status": "status", "hours": "estimate"},
                }
            },
        }
    )
    items = [i async for i in tapped("cmms", conf, TapRequest(entity="work_orders", limit=5))]
    got = [(i.remote_id, i.data["title"]) for i in items if isinstance(i, Record)]
    assert got == [("WO-7", "Replace door motor"), ("WO-9", "Lubricate")]
    first = next(i for i in items if isinstance(i, Record))
    assert first.source_modified_at == "2026-11-20T08:00:00.000Z"
    assert first.data == {"title": "Replace door motor", "status": "released", "hours": None}
    (bad,) = [i for i in items if isinstance(i, Quarantined)]
    line = orjson.loads(tap_cli.json_line(bad))["bad_input"]
    assert line["reason"] == "mapping_failed: TypeError", line
    assert line["context"]["entity"] == "work_orders"
    assert "Range" in line["context"]["error"], line
    assert "WO-8" in line["payload"]
    shown = tap_cli.table(bad, 2)
    assert shown.startswith("#2 BAD INPUT mapping_failed: TypeError"), shown


# ---------------------------------------------------------------------- Modbus


def modbus_agent(tmp_path: Path, port: int, units: dict[str, int]) -> Path:
    devices = {
        name: {
            "connection": "gw",
            "unit_id": unit,
            "asset": f"asset-{name}",
            "interval": "1h",
            "points": [
                {"name": "temp", "address": 0, "type": "int16", "scale": 0.1, "unit": "degC"},
                {"name": "state", "address": 1, "type": "uint16", "kind": "state"},
            ],
        }
        for name, unit in units.items()
    }
    source = {
        "type": "modbus",
        "connections": {"gw": {"host": "127.0.0.1", "port": port, "timeout": "300ms"}},
        "devices": devices,
    }
    data = base_config(tmp_path, sources={"meters": source})
    return write_config(tmp_path / "agent.toml", data)


@contextlib.asynccontextmanager
async def modbus_server(port: int) -> AsyncIterator[None]:
    server = await start_server([sim_device(1, holding={0: [215, 2]})], port)
    try:
        yield
    finally:
        await server.shutdown()


async def test_modbus_tap_polls_every_device_once_and_shows_a_dead_one(tmp_path: Path) -> None:
    port = free_port()
    conf_file = modbus_agent(tmp_path, port, {"ok": 1, "dead": 9})
    settings, _ = cfg.load(conf_file)
    shown: list[Tapped] = []
    async with modbus_server(port):
        records_, bad = await tap_cli.collect(settings, "meters", TapRequest(), shown.append)
    assert (records_, bad) == (2, 1), shown
    temp, state, dead = shown
    assert isinstance(temp, Record)
    assert isinstance(state, Record)
    assert (temp.remote_id, temp.data["value"], temp.data["unit"]) == ("ok.temp", 21.5, "degC")
    assert (state.entity_type, state.data["raw_code"]) == ("event", 2)
    assert "(provisional)" not in tap_cli.table(temp, 1)  # a reading's id is final
    assert isinstance(dead, Quarantined)
    assert dead.reason.startswith("poll_failed")
    assert dead.context["device"] == "dead"
    assert dead.context["unit_id"] == 9

    only: list[Tapped] = []
    async with modbus_server(port):
        request = TapRequest(entity="ok")
        assert await tap_cli.collect(settings, "meters", request, only.append) == (2, 0)


def test_modbus_tap_cli_unreachable_and_unknown_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = modbus_agent(tmp_path, free_port(), {"ok": 1})
    assert main(["--config", str(conf), "tap", "meters"]) == 1
    err = capsys.readouterr().err
    assert "cannot poll: connection 'gw' (127.0.0.1:" in err, err
    assert "Traceback" not in err
    assert main(["--config", str(conf), "tap", "meters", "--entity", "nope"]) == 2
    assert "no device 'nope' (it has: ok)" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf, _ = sqlite_agent(tmp_path, tmp_path / "cmms.db", rows=1)
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(conf), "tap", "cmms", "--limit", "0"])
    assert exc.value.code == 2
    assert "not a positive whole number" in capsys.readouterr().err


def test_tap_takes_config_after_the_subcommand_too() -> None:
    args = build_parser().parse_args(["tap", "cmms", "--config", "after.toml", "--timeout", "30s"])
    assert (args.config, args.source, args.timeout, args.limit) == ("after.toml", "cmms", 30.0, 10)


def test_sql_tap_of_an_unreachable_database_is_one_line_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql+asyncpg://edge@127.0.0.1:{free_port()}/cmms"
    source = {**declarative_source(url), "query_timeout": "5s", "password": "s3cret-pw"}
    conf = write_config(tmp_path / "agent.toml", base_config(tmp_path, sources={"cmms": source}))
    assert main(["--config", str(conf), "tap", "cmms"]) == 1
    err = capsys.readouterr().err
    assert "tap cmms: cannot query entity 'work_orders' on postgresql+asyncpg://edge:***@" in err
    assert "s3cret-pw" not in err
    assert "Traceback" not in err


async def test_mqtt_tap_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    """The tap connects as the source does (its TLS settings); an untrusted broker is a
    runtime error naming the broker, not a traceback."""
    if not have_mosquitto():
        pytest.skip("mosquitto is not installed")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other.cert_pem.write_to_path(str(tmp_path / "other.pem"))
    server.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    ca.issue_cert("edge-agent").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "client.pem")
    )
    tls = Tls(tmp_path / "ca.pem", tmp_path / "server.crt", tmp_path / "server.key", True)
    broker = Mosquitto(tmp_path / "broker", tls=tls)
    broker.start()
    try:
        with Publisher(broker.port) as pub:  # the plain listener
            pub.publish(TELEMETRY.format(asset="T1"), telemetry("T1", 9.0), retain=True)
        conf = mqtt_config(
            broker.tls_port,
            tls={"ca_file": str(tmp_path / "ca.pem"), "cert_file": str(tmp_path / "client.pem")},
        )
        items = [i async for i in tapped("lifts", conf, TapRequest(limit=1, timeout=30))]
        assert [i.remote_id for i in items if isinstance(i, Record)] == ["T1/load"]
        untrusted = mqtt_config(broker.tls_port, tls={"ca_file": str(tmp_path / "other.pem")})
        with pytest.raises(TransientError) as err:
            _ = [i async for i in tapped("lifts", untrusted, TapRequest(limit=1, timeout=30))]
        assert f"cannot read from broker 127.0.0.1:{broker.tls_port}" in str(err.value)
        assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)
    finally:
        broker.stop()


def test_a_disabled_source_can_be_tapped_before_it_is_enabled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = {**declarative_source(sqlite_cmms(tmp_path / "cmms.db", rows=2)), "enabled": False}
    conf = write_config(tmp_path / "agent.toml", base_config(tmp_path, sources={"cmms": source}))
    assert main(["--config", str(conf), "tap", "cmms", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_a_source_type_without_tap_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every registered type declares tap today: one that did not is made from the real
    # record (the registry is the only thing replaced; no peer is involved).
    real = tap_cli.source_plugins.source_plugin

    def without_tap(kind: str) -> Any:
        plugin = real(kind)
        return dataclasses.replace(plugin, tap=None) if kind == "sql" else plugin

    monkeypatch.setattr(tap_cli.source_plugins, "source_plugin", without_tap)
    conf, _ = sqlite_agent(tmp_path, tmp_path / "cmms.db", rows=1)
    assert main(["--config", str(conf), "tap", "cmms"]) == 2
    err = capsys.readouterr().err
    assert "sources.cmms.type: 'sql' sources have no tap (types with one: modbus, mqtt)" in err


async def test_modbus_tap_beside_the_polling_service(tmp_path: Path) -> None:
    """Over TCP the tap is one more client: the service's connection stays up and its
    polls go on while the tap polls."""
    port = free_port()
    settings, _ = cfg.load(modbus_agent(tmp_path, port, {"ok": 1}))
    conf = settings.sources["meters"]
    assert isinstance(conf, ModbusConfig)
    fast = conf.model_copy(
        update={"devices": {"ok": conf.devices["ok"].model_copy(update={"interval": 0.05})}}
    )
    service = ModbusSource("meters", fast, CONTEXT)
    out = TestOutput()
    async with modbus_server(port), modbus_running(service, out):
        await until(lambda: len(out.records) >= 2, what="the service's first poll")
        before = service.status()["devices"]["ok"]["polls"]
        shown = [i async for i in tapped("meters", conf, TapRequest())]
        await until(lambda: service.status()["devices"]["ok"]["polls"] > before + 2, what="polls")
        status = service.status()
    assert [i.remote_id for i in shown if isinstance(i, Record)] == ["ok.temp", "ok.state"]
    assert status["connections"]["gw"]["connects"] == 1, status
    assert status["devices"]["ok"]["consecutive_failures"] == 0, status
