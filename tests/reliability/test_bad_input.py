"""Bad input: malformed MQTT payloads, Modbus exceptions and timeouts, bad SQL rows.

The rule everywhere: no crash; every bad input is quarantined or counted with a reason;
good input beside it still flows.

* MQTT: the corpus in ``corpus/mqtt/`` (59 payloads, written by
  ``corpus/make_mqtt_corpus.py``; each file name says the reason the agent must give),
  first through the mapper, then through the daemon with good messages interleaved.
* Modbus: a healthy unit beside units that answer exception codes 1, 4, 6 and 11, a unit
  that never answers (timeouts), a unit that answers short (one register for a float32),
  a point at an illegal address and a float that is NaN. (More unit faults on one shared
  gateway: tests/test_modbus_isolation.py.)
* SQL: SAP orders with impossible dates, NULLs in NOT NULL-by-convention columns and
  1 MiB of text, beside good orders, on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from agent.outbox import Outbox
from agent.records import SourceRef
from agent.sources.base import SourceContext
from agent.sources.modbus import ModbusConfig, ModbusSource
from agent.sources.mqtt import MqttConfig
from agent.sources.mqtt.mapping import Mapper
from agent.sources.sql import SqlSource, SqlSourceConfig
from tests.helpers.agentproc import outbox_rows
from tests.helpers.mosquitto import Mosquitto
from tests.helpers.mqttpub import Publisher
from tests.helpers.outputs import TestOutput
from tests.helpers.waiting import free_port
from tests.modbus_sim import MuteProxy, running, sim_device, start_server
from tests.reliability.support import (
    T0,
    Agent,
    ReceiverProc,
    agent_config,
    message,
    mqtt_source,
    reading_id,
    report,
    wait_until,
)
from tests.sql.sapdb import SapDb

pytestmark = pytest.mark.reliability

CORPUS = sorted((Path(__file__).parent / "corpus" / "mqtt").glob("*.bin"))
COUNTED = {"timestamp_fallback"}  # mapped with the receive time, and counted


def expected(path: Path) -> str:
    return path.stem.split("-", 1)[1]


def corpus_source(port: int = 1883) -> dict[str, Any]:
    source = mqtt_source(port, "rel-bad-input")
    source["subscriptions"][0]["points"][0]["type"] = "float"
    return source


def test_corpus_is_large_enough_and_reproducible() -> None:
    from tests.reliability.corpus.make_mqtt_corpus import corpus  # noqa: PLC0415

    assert len(CORPUS) >= 50
    assert [(expected(p), p.read_bytes()) for p in CORPUS] == corpus()


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_mapper_gives_each_bad_payload_its_reason(path: Path) -> None:
    config = MqttConfig.model_validate(corpus_source())
    mapper = Mapper(SourceRef("plant", "mqtt", "s"), config)
    now = datetime.now(UTC)
    outcome = mapper.map("rel/BAD/v", path.read_bytes(), now)
    if expected(path) in COUNTED:
        assert outcome.quarantine is None
        assert mapper.counters[expected(path)] == 1
    else:
        assert outcome.quarantine is not None
        assert outcome.quarantine.reason == expected(path)
        assert outcome.records == []
    # Good input beside it still maps (the mapper keeps no poisoned state).
    asset, topic, payload = message(1)
    good = mapper.map(topic, payload.encode(), now)
    assert [r.id for r in good.records] == [reading_id(asset, T0 + 1, mapper.ref, corpus_source())]


@pytest.mark.slow
def test_corpus_through_the_daemon(tmp_path: Path, mosquitto: Mosquitto) -> None:
    rx = ReceiverProc(tmp_path).start()
    config = agent_config(tmp_path, rx.url, sources={"plant": corpus_source(mosquitto.port)})
    agent = Agent(tmp_path, config).start()
    try:
        wait_until(lambda: agent.events("mqtt_subscribed"), "MQTT subscribed")
        with Publisher(mosquitto.port) as pub:
            for n, path in enumerate(CORPUS):
                pub.publish(message(n)[1], message(n)[2])  # good, beside each bad one
                pub.publish(f"rel/BAD{n:03d}/v", path.read_bytes())
            pub.publish(message(len(CORPUS))[1], message(len(CORPUS))[2])
        good = {
            reading_id(message(n)[0], T0 + n, source=corpus_source())
            for n in range(len(CORPUS) + 1)
        }
        wait_until(lambda: good <= rx.ids(), "every good message at the receiver")
        quarantined = {
            json.loads(ctx)["topic"]: reason
            for reason, ctx in outbox_rows(agent.outbox, "SELECT reason, context FROM quarantine")
        }
        want = {
            f"rel/BAD{n:03d}/v": expected(p)
            for n, p in enumerate(CORPUS)
            if expected(p) not in COUNTED
        }
        assert quarantined == want
        problems = agent.status_sync()["sources"]["plant"]["input_problems"]
        counted = sum(1 for p in CORPUS if expected(p) in COUNTED)
        assert problems.get("timestamp_fallback", 0) >= counted
        agent.check_alive()
        assert agent.stop() == 0
    finally:
        agent.kill()
        rx.kill()
    report(
        "bad_input_mqtt",
        payloads=len(CORPUS),
        quarantined=len(quarantined),
        counted=counted,
        good_delivered=len(good),
        reasons=dict(Counter(want.values())),
    )


# ---------------------------------------------------------------------- Modbus


SHORT = 20


class ExceptionServer:
    """A Modbus TCP peer that answers every request with exception code = unit id; units
    from 20 up answer a read with ONE register, whatever was asked (a buggy device)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.answered: Counter[int] = Counter()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> ExceptionServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        # Python 3.11's Server.close() leaves connection handlers running: stop them, so
        # no transport outlives the test (the GC would report it in a later one).
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._answer(reader, writer)
        finally:
            writer.close()
            self._handlers.discard(task)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                tid, proto, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
                function = (await reader.readexactly(length - 1))[0]
                self.answered[unit] += 1
                if unit >= SHORT:
                    frame = struct.pack(">HHHBBBH", tid, proto, 5, unit, function, 2, 0x4000)
                else:
                    frame = struct.pack(">HHHBBB", tid, proto, 3, unit, function | 0x80, unit)
                writer.write(frame)
                await writer.drain()


def modbus_config(good_port: int, proxy_port: int, bad_port: int) -> ModbusConfig:
    def device(conn: str, unit: int, points: list[dict[str, Any]]) -> dict[str, Any]:
        return {"connection": conn, "unit_id": unit, "interval": "50ms",
                "demote_after": 3, "demote_for": "200ms", "points": points}  # fmt: skip

    v = [{"name": "v", "address": 0}]
    devices = {
        "healthy": device("good", 1, [
            {"name": "energy", "address": 0},
            {"name": "ghost", "address": 500},  # illegal data address
            {"name": "nan", "address": 2, "type": "float32"},  # registers hold a NaN
        ]),
        "silent": device("proxy", 2, v),  # never answers: timeouts
        **{f"exc{code}": device("bad", code, v) for code in (1, 4, 6, 11)},
        "short": device("bad", SHORT, [{"name": "f", "address": 0, "type": "float32"}]),
    }  # fmt: skip
    conns = {
        "good": {"host": "127.0.0.1", "port": good_port, "timeout": "300ms", "retries": 0},
        "proxy": {"host": "127.0.0.1", "port": proxy_port, "timeout": "200ms", "retries": 0},
        "bad": {"host": "127.0.0.1", "port": bad_port, "timeout": "300ms", "retries": 0},
    }
    return ModbusConfig.model_validate({"type": "modbus", "connections": conns, "devices": devices})


async def test_modbus_exceptions_timeouts_and_bad_values() -> None:
    good_port, proxy_port = free_port(), free_port()
    server = await start_server(
        [sim_device(1, holding={0: [42, 0, 0x7FC0, 0x0000]}), sim_device(2, holding={0: [2]})],
        good_port,
    )
    proxy = MuteProxy(good_port, mute={2})
    await proxy.start(proxy_port)
    out = TestOutput()
    try:
        async with ExceptionServer() as bad:
            source = ModbusSource("m", modbus_config(good_port, proxy_port, bad.port),
                                  SourceContext(agent_id="a", site="s"))  # fmt: skip
            devices = source.devices
            async with running(source, out) as task:

                def errors_seen() -> bool:
                    return all(devices[f"exc{c}"].failures >= 2 for c in (1, 4, 6, 11)) and (
                        devices["silent"].failures >= 2 and devices["short"].failures >= 2
                    )

                await poll(errors_seen, "every bad unit failed twice")
                before = len(out.readings("healthy/energy") or out.records)
                await poll(lambda: len(out.records) >= before + 10, "good readings go on")
                assert not task.done(), "the source keeps running"
                status = source.status()
    finally:
        await proxy.stop()
        await server.shutdown()
    for code in (1, 4, 6, 11):
        assert f"exception code {code}" in (devices[f"exc{code}"].last_error or "")
    assert devices["silent"].last_error
    assert devices["healthy"].invalid_points == {"ghost": "illegal data address"}
    # The device that answers one register where two were asked: a unit fault, counted
    # by kind and named; its answer is never decoded.
    assert devices["short"].errors["wrong_length"] == devices["short"].failures
    assert devices["short"].last_error == "answer holds 1 registers, asked 2"
    reasons = sorted(q.reason for q in out.quarantined)
    # once per bad spell each: the NaN point and the point at an illegal address
    assert reasons == ["decode: not a finite number (nan)", "illegal_data_address"]
    assert status["counters"]["decode_errors"] >= 1
    energy = [r for r in out.records if r.data.get("point") == "energy"]
    assert energy
    assert all(r.data["value"] == 42 for r in energy)
    report(
        "bad_input_modbus",
        exception_codes=[1, 4, 6, 11],
        failures={n: d.failures for n, d in devices.items()},
        decode_errors=status["counters"]["decode_errors"],
        good_readings=len(energy),
    )


async def poll(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not met within {timeout}s")
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------- SQL

PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
HUGE = "x" * (1 << 20)


@pytest.fixture
async def sap_pg() -> AsyncIterator[tuple[SapDb, str]]:
    schema = f"rel_{uuid.uuid4().hex[:10]}"
    engine = create_async_engine(PG)
    async with engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        db = SapDb(engine, schema)
        await db.create()
        async with engine.begin() as conn:  # room for what a sloppy interface writes
            await conn.execute(text(f'ALTER TABLE "{schema}"."AUFK" ALTER COLUMN "KTEXT" '
                                    "TYPE TEXT, ALTER COLUMN \"KTEXT\" DROP NOT NULL"))  # fmt: skip
            await conn.execute(text(f'ALTER TABLE "{schema}"."AFKO" ALTER COLUMN "GSTRP" '
                                    "DROP NOT NULL"))  # fmt: skip
        yield db, schema
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await engine.dispose()


async def test_sql_rows_with_nulls_impossible_dates_and_huge_text(
    tmp_path: Path, sap_pg: tuple[SapDb, str]
) -> None:
    db, schema = sap_pg
    today = datetime.now(UTC).strftime("%Y%m%d")
    good = ["000000000031", "000000000035"]
    await db.order(good[0], aedat=today)
    await db.order("000000000032", aedat=today, gstrp="20260230")  # 30 February
    await db.order("000000000033", aedat=today, gstrp="99999999")
    await db.order("000000000034", aedat=today, ktext=HUGE)
    await db.order(good[1], aedat=today)
    await db.execute(text(f'UPDATE "{schema}"."AUFK" SET "KTEXT" = NULL '
                          "WHERE \"AUFNR\" = '000000000035'"))  # fmt: skip
    await db.order("000000000036", aedat=today, erdat="2026ABCD")
    await db.execute(text(f'UPDATE "{schema}"."AFKO" SET "GSTRP" = NULL '
                          "WHERE \"AUFNR\" = '000000000036'"))  # fmt: skip
    config = SqlSourceConfig.model_validate(
        {
            "type": "sql",
            "url": PG,
            "profile": "sap_ecc",
            "schema": schema,
            "include": ["work_orders"],
        }
    )
    source = SqlSource("sap", config, SourceContext(agent_id="a", site="plant-1000"))
    async with Outbox(tmp_path / "outbox.db") as box:
        try:
            status = await source.sync_once(box)
        finally:
            await source.aclose()
        rows = outbox_rows(box.path, "SELECT body FROM records")
        bad = await box.quarantined()
    stored = {json.loads(b)["remote_id"]: json.loads(b) for (b,) in rows}
    keys = {q["context"]["key"][0]: q["reason"] for q in bad}
    everything = {f"0000000000{n}" for n in range(31, 37)}
    # Each row is either stored or quarantined with a reason; the good ones are stored.
    assert set(stored) | set(keys) == everything
    assert not set(stored) & set(keys)
    assert set(good) <= set(stored)
    assert {"000000000032", "000000000033"} <= set(keys), "impossible dates are quarantined"
    assert all(reason for reason in keys.values())
    assert status["work_orders"]["status"] == "completed"
    if "000000000034" in stored:  # huge text is legal data: kept whole, not truncated
        assert stored["000000000034"]["data"]["title"] == HUGE
    report("bad_input_sql", rows=len(everything), stored=sorted(stored),
           quarantined=keys)  # fmt: skip
