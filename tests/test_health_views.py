"""Typed health as an operator sees it: /readyz, /v1/status and ``edge-agent status`` of a
real agent say the same thing about a source, whatever state it is in.

* Every registered source type (its contract harness's real peer: mosquitto, pymodbus's
  server, PostgreSQL), reached through a :class:`~tests.helpers.gate.Gate`: ``starting``
  while the peer's first answer is held back, ``ok`` once it answers, ``retrying`` while
  the peer is gone (connection refused), ``ok`` again once it is back. In each state the
  three views agree, and /readyz answers 503 exactly while the source is not ok (the
  upstream is the reference receiver, so nothing else is unready).
* A crash-looping source (its TLS CA file replaced by garbage after the config was
  checked: every start fails) makes /readyz 503 with "crash-looping: N restarts in M
  minutes", and stays so while the source, its CA fixed, runs and is connected.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from agent import ctl
from agent.health import State
from agent.receiver import running_receiver
from tests.agent_harness import running_agent, settings_for
from tests.contract.harness import HARNESSES, SourceHarness, Unavailable
from tests.contract.registry import source_types
from tests.helpers.gate import Gate
from tests.helpers.mosquitto import Mosquitto, Tls, have_mosquitto
from tests.helpers.waiting import wait_for

TOKEN = "health-views-upstream"
NAME = "src"


def _mqtt(table: dict[str, Any], port: int) -> dict[str, Any]:
    # a CONNACK held back must not time the first connect out while the test looks
    return {**table, "port": port, "connect_timeout": "30s"}


def _modbus(table: dict[str, Any], port: int) -> dict[str, Any]:
    table = copy.deepcopy(table)
    for conn in table["connections"].values():  # a held answer is no failed poll
        conn.update(port=port, timeout="30s")
    return table


def _sql(table: dict[str, Any], port: int) -> dict[str, Any]:
    host = "@127.0.0.1:5432/"
    assert host in table["url"], table["url"]
    return {**table, "url": table["url"].replace(host, f"@127.0.0.1:{port}/")}


THROUGH: dict[str, Callable[[dict[str, Any], int], dict[str, Any]]] = {
    "mqtt": _mqtt,
    "modbus": _modbus,
    "sql": _sql,
}
"""How a harness's table reaches its peer through a gate on another port, per type."""

PEER_PORT: dict[str, Callable[[Any], int]] = {
    "mqtt": lambda h: h.broker.port,
    "modbus": lambda h: h.port,
    "sql": lambda h: 5432,
}

PARAMS = [
    pytest.param(cls, id=kind) for kind in source_types() for cls in HARNESSES.get(kind, [])[:1]
]


def test_every_source_type_is_routed_through_a_gate() -> None:
    """A new source type gets these cases by one line in THROUGH and PEER_PORT."""
    assert set(source_types()) <= set(THROUGH) & set(PEER_PORT)


@pytest.fixture(params=PARAMS)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SourceHarness]:
    try:
        h: SourceHarness = request.param(tmp_path)
        await h.start()
    except Unavailable as exc:
        pytest.skip(str(exc))
    try:
        yield h
    finally:
        await h.stop()


async def views(http: httpx.AsyncClient, name: str) -> dict[str, Any]:
    """The source's state as /readyz, /v1/status and ``edge-agent status`` show it."""
    ready = await http.get("/readyz")
    status = (await http.get("/v1/status")).json()
    url = str(http.base_url).rstrip("/")
    printed = ctl.render_status(await asyncio.to_thread(ctl.fetch_status, url))
    row = next(line for line in printed.splitlines() if line.startswith(f"{name} "))
    mine = [r for r in ready.json()["reasons"] if r.startswith(f"source {name} ")]
    return {
        "readyz": ready.status_code,
        "readyz_reason": mine[0] if mine else None,
        "status": status["sources"][name]["state"],
        "reason": status["sources"][name]["reason"],
        "cli": row.split()[2],
        "cli_reasons": [line.strip() for line in printed.splitlines() if line.startswith("    ")],
    }


def agree(seen: dict[str, Any], state: State) -> bool:
    """All three views say ``state`` (and /readyz is 503 exactly when it is not ready)."""
    if seen["status"] != state or seen["cli"] != state:
        return False
    if state is State.OK:
        return seen["readyz"] == 200 and seen["readyz_reason"] is None
    reason = seen["readyz_reason"]
    return (
        seen["readyz"] == 503
        and reason is not None
        and reason.startswith(f"source {NAME} is {state.value}")
        and f"- {reason}" in seen["cli_reasons"]
    )


async def test_starting_ok_retrying_ok_seen_alike_everywhere(
    harness: SourceHarness, tmp_path: Path
) -> None:
    kind = harness.type
    async with (
        running_receiver(tmp_path / "rx.db", TOKEN) as rx,
        Gate(PEER_PORT[kind](harness)) as gate,
    ):
        table = THROUGH[kind](harness.table(NAME), gate.port)
        settings = settings_for(
            tmp_path, upstream={"url": rx.url, "token": TOKEN}, sources={NAME: table}
        )
        async with (
            running_agent(settings),
            httpx.AsyncClient(base_url=f"http://{settings.api.listen}") as http,
        ):

            async def reach(state: State, what: str) -> dict[str, Any]:
                seen: dict[str, Any] = {}

                async def check() -> bool:
                    seen.update(await views(http, NAME))
                    return agree(seen, state)

                await wait_for(check, 30, what, detail=lambda: seen)
                return seen

            held = await reach(State.STARTING, "starting while the peer's answer is held")
            assert held["reason"], held
            await gate.open()
            await reach(State.OK, "ok once the peer answers")
            await gate.refuse()
            gone = await reach(State.RETRYING, "retrying while the peer is gone")
            assert gone["reason"], gone
            await gate.open()
            await reach(State.OK, "ok again once the peer is back")


@pytest.mark.skipif(not have_mosquitto(), reason="mosquitto is not installed")
async def test_a_crash_looping_source_makes_readyz_503_with_that_reason(tmp_path: Path) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, good = tmp_path / "ca.pem", ca.cert_pem.bytes()
    ca_file.write_bytes(good)
    server.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    broker = Mosquitto(
        tmp_path / "broker", tls=Tls(ca_file, tmp_path / "server.crt", tmp_path / "server.key")
    )
    await asyncio.to_thread(broker.start)
    try:
        async with running_receiver(tmp_path / "rx.db", TOKEN) as rx:
            settings = settings_for(
                tmp_path,
                upstream={"url": rx.url, "token": TOKEN},
                api={"ready_crash_loop_restarts": 3, "ready_crash_loop_window": "10m"},
                sources={NAME: _tls_source(broker.tls_port, ca_file)},
            )
            # Checked and accepted, then broken on disk: each start of the source fails
            # to load it (ssl.SSLError out of run()), and the supervisor restarts it.
            ca_file.write_text("not a certificate\n")
            async with (
                running_agent(settings) as agent,
                httpx.AsyncClient(base_url=f"http://{settings.api.listen}") as http,
            ):
                looping = f"source {NAME} is failed: crash-looping: 3 restarts in 10 minutes"
                seen: dict[str, Any] = {}

                async def crash_looping() -> bool:
                    seen.update(await views(http, NAME))
                    return agree(seen, State.FAILED) and seen["readyz_reason"].startswith(looping)

                await wait_for(crash_looping, 60, "crash-looping in every view", detail=lambda: seen)
                assert "SSLError" in seen["reason"], seen
                metrics = (await http.get("/metrics")).text
                assert (
                    f'edge_agent_component_state{{component="{NAME}",kind="source",state="failed"}}'
                    " 1.0" in metrics
                )
                ca_file.write_bytes(good)  # fixed: the next start connects and runs
                slot = agent.slots[NAME]

                def runs_connected() -> bool:
                    own = slot.source.health() if slot.running and slot.source else None
                    return own is not None and own.health.state is State.OK

                await wait_for(runs_connected, 60, "the source connected after its fix")
                seen.update(await views(http, NAME))
                assert agree(seen, State.FAILED), seen  # 3 restarts in 10 minutes still
                assert seen["readyz_reason"].startswith(looping), seen
    finally:
        await asyncio.to_thread(broker.stop)


def _tls_source(port: int | None, ca_file: Path) -> dict[str, Any]:
    return {
        "type": "mqtt",
        "host": "127.0.0.1",
        "port": port,
        "client_id": "crash-loop-test",
        "tls": {"ca_file": str(ca_file)},
        "subscriptions": [
            {"topic": "a/{asset}", "asset": "{asset}", "points": [{"name": "v", "path": "v"}]}
        ],
    }
