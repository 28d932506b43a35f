"""One harness per source type: the real peer, and what the source contract suite needs.

A harness owns a real peer on 127.0.0.1 (a private mosquitto, pymodbus's server, a
private PostgreSQL schema) and knows how to

* make a ``[sources.<name>]`` table for it (:meth:`SourceHarness.table`);
* feed good input (:meth:`~SourceHarness.feed`) and one bad input
  (:meth:`~SourceHarness.feed_bad`), remembering what a lossless source must deliver
  (:meth:`~SourceHarness.expected`, compared with :meth:`~SourceHarness.key` of every
  stored record);
* break and restore the peer (:meth:`~SourceHarness.break_peer`,
  :meth:`~SourceHarness.restore_peer`).

Adding a source type to the contract suite is one class here and one line in
:data:`HARNESSES`; the meta-test fails until a registered type has one.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from agent.health import State
from agent.sources.base import Source, SourceConfig
from tests.helpers.mosquitto import Mosquitto, have_mosquitto
from tests.helpers.mqttpub import Publisher
from tests.helpers.waiting import free_port
from tests.modbus_sim import sim_device, start_server
from tests.sql.sapdb import SapDb

Envelope = dict[str, Any]


class Unavailable(Exception):
    """The harness's peer cannot be had on this machine (the case is skipped)."""


class SourceHarness(abc.ABC):
    """A source type's peer and inputs; see the module docstring."""

    type: ClassVar[str]
    """The registered source type this harness drives."""
    duplicates_possible: ClassVar[bool] = True
    """Whether a crash may leave one input stored twice (a redelivery of something
    committed and not yet acknowledged). False where a committed cursor rules that out."""
    bad_reason: ClassVar[str]
    """A part of the quarantine reason of :meth:`feed_bad`'s input."""
    flood: ClassVar[int] = 30
    """Inputs fed while appends wait (MQTT: more than ``max_held_bytes`` holds)."""
    live: ClassVar[bool] = False
    """Whether input reaches only a reader that is there when it is fed (MQTT without
    retain); otherwise a reader that comes later still reads what was fed (rows,
    registers)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the peer."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop the peer for good (end of the test)."""

    @abc.abstractmethod
    def table(self, name: str, **over: Any) -> dict[str, Any]:
        """A ``[sources.<name>]`` table for this peer (``over`` merged in); tables of
        two names may run at once (MQTT: their own client ids)."""

    def changed(self, table: dict[str, Any]) -> dict[str, Any]:
        """``table`` with one harmless setting changed (for the reload case)."""
        return {**table, "site": f"{table.get('site') or 'site'}-reloaded"}

    @abc.abstractmethod
    async def ready(self, source: Source, stored: Callable[[], list[Envelope]]) -> None:
        """Wait until ``source`` has proven its peer (it now takes input that is fed)."""

    @abc.abstractmethod
    async def feed(self, n: int = 1) -> None:
        """Make ``n`` new good inputs available."""

    @abc.abstractmethod
    async def feed_bad(self) -> None:
        """Make one bad input available (after the good ones so far)."""

    @abc.abstractmethod
    def expected(self) -> set[str]:
        """Keys of what a lossless source must have stored, of everything fed so far."""

    @abc.abstractmethod
    def key(self, record: Envelope) -> str | None:
        """The key of a stored record (None: not one of the fed inputs)."""

    @abc.abstractmethod
    async def break_peer(self) -> None:
        """Take the peer away (the source cannot read)."""

    @abc.abstractmethod
    async def restore_peer(self) -> None:
        """Bring it back."""

    def held(self, source: Source) -> tuple[int, int] | None:
        """Bytes the source holds in memory waiting for a commit, and its bound."""
        return None


# ---------------------------------------------------------------------- MQTT


class MqttHarness(SourceHarness):
    """A private mosquitto; JSON telemetry of one lift, QoS 1, in a persistent session."""

    type = "mqtt"
    bad_reason = "invalid_json"
    live = True
    flood = 200
    TOPIC = "site/s1/lift/L1/telemetry"
    MAX_HELD = 32 * 1024

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        if not have_mosquitto():
            raise Unavailable("mosquitto is not installed")
        self.broker = Mosquitto(workdir / "mosquitto")
        self.fed: list[int] = []
        self._values = itertools.count(1)
        self._run = uuid.uuid4().hex[:6]  # client ids of this test only
        self._pub: Publisher | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self.broker.start)

    async def stop(self) -> None:
        if self._pub is not None:
            await asyncio.to_thread(self._pub.close)
        await asyncio.to_thread(self.broker.stop)

    def table(self, name: str, **over: Any) -> dict[str, Any]:
        return {
            "type": "mqtt",
            "host": "127.0.0.1",
            "port": self.broker.port,
            "client_id": f"contract-{self._run}-{name}",
            "reconnect_initial": "50ms",
            "reconnect_cap": "300ms",
            "max_payload_bytes": 4096,
            "max_held_bytes": self.MAX_HELD,
            "batch_max_messages": 20,
            "subscriptions": [
                {
                    "topic": "site/{site}/lift/{asset}/telemetry",
                    "asset": "{asset}",
                    "site": "{site}",
                    "timestamp_path": "ts",
                    "points": [{"name": "load", "path": "load.kg", "type": "float"}],
                }
            ],
            **over,
        }

    async def ready(self, source: Source, stored: Callable[[], list[Envelope]]) -> None:
        from tests.helpers.waiting import wait_for  # noqa: PLC0415

        # subscribed: from now on the broker keeps our messages in the session
        await wait_for(lambda: _subscribed(source), 30, "MQTT source subscribed")

    def _publisher(self) -> Publisher:
        if self._pub is None:
            self._pub = Publisher(self.broker.port)
        return self._pub

    async def feed(self, n: int = 1) -> None:
        values = [next(self._values) for _ in range(n)]
        pad = "x" * 600  # a few hundred bytes each: max_held_bytes is reached quickly
        msgs = [(self.TOPIC, json.dumps({"ts": 1_790_000_000 + v, "load": {"kg": v},
                                         "pad": pad})) for v in values]  # fmt: skip
        await asyncio.to_thread(self._publisher().publish_many, msgs)
        self.fed += values

    async def feed_bad(self) -> None:
        await asyncio.to_thread(self._publisher().publish, self.TOPIC, b"{not json")

    def expected(self) -> set[str]:
        return {f"load={v}" for v in self.fed}

    def key(self, record: Envelope) -> str | None:
        if record["entity_type"] != "meter_reading":
            return None
        return f"load={int(record['data']['value'])}"

    async def break_peer(self) -> None:
        if self._pub is not None:
            await asyncio.to_thread(self._pub.close)
            self._pub = None
        await asyncio.to_thread(self.broker.stop)

    async def restore_peer(self) -> None:
        await asyncio.to_thread(self.broker.start)

    def held(self, source: Source) -> tuple[int, int]:
        return int(source.status()["held_bytes"]), self.MAX_HELD


def _subscribed(source: Source) -> bool:
    # the MQTT source is ok once its subscriptions are granted
    return source.health().health.state is State.OK


# ---------------------------------------------------------------------- Modbus


class ModbusHarness(SourceHarness):
    """pymodbus's server with one unit: an energy counter (uint16) and a temperature
    (float32, NaN when fed bad). A poller samples: only the latest value must arrive."""

    type = "modbus"
    bad_reason = "not a finite number"
    HOLDING = 3  # function code of holding registers (pymodbus setValues)
    FINE: ClassVar[list[int]] = [0x3F80, 0x0000]  # 1.0
    NAN: ClassVar[list[int]] = [0x7FC0, 0x0000]

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.server: Any = None
        self.value = 0
        self.temp = list(self.FINE)

    async def start(self) -> None:
        registers = [self.value, *self.temp]
        self.server = await start_server([sim_device(1, holding={0: registers})], self.port)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown()
            self.server = None

    def table(self, name: str, **over: Any) -> dict[str, Any]:
        return {
            "type": "modbus",
            "connections": {
                "c": {
                    "host": "127.0.0.1",
                    "port": self.port,
                    "timeout": "300ms",
                    "reconnect_initial": "50ms",
                    "reconnect_max": "300ms",
                }
            },
            "devices": {
                "meter": {
                    "connection": "c",
                    "unit_id": 1,
                    "interval": "20ms",
                    "points": [
                        {"name": "energy", "address": 0, "type": "uint16"},
                        {"name": "temp", "address": 1, "type": "float32"},
                    ],
                }
            },
            **over,
        }

    async def ready(self, source: Source, stored: Callable[[], list[Envelope]]) -> None:
        from tests.helpers.waiting import wait_for  # noqa: PLC0415

        await wait_for(lambda: f"energy={self.value}" in {self.key(r) for r in stored()},
                       30, "first Modbus poll stored")  # fmt: skip

    async def _write(self) -> None:
        await self.server.async_setValues(1, self.HOLDING, 0, [self.value, *self.temp])

    async def feed(self, n: int = 1) -> None:
        self.value = (self.value + n) % 65536
        self.temp = list(self.FINE)
        await self._write()

    async def feed_bad(self) -> None:
        self.temp = list(self.NAN)
        await self._write()

    def expected(self) -> set[str]:
        return {f"energy={self.value}"}

    def key(self, record: Envelope) -> str | None:
        data = record.get("data", {})
        if record["entity_type"] != "meter_reading" or data.get("point") != "energy":
            return None
        return f"energy={data['value']}"

    async def break_peer(self) -> None:
        await self.stop()

    async def restore_peer(self) -> None:
        await self.start()


# ---------------------------------------------------------------------- SQL


PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


class SqlHarness(SourceHarness):
    """SAP ECC work orders in a private PostgreSQL schema (the real server), read by the
    ``sap_ecc`` profile. An order whose start date is 30 February is the bad input."""

    type = "sql"
    duplicates_possible = False
    bad_reason = "mapping_failed"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.schema = f"contract_{uuid.uuid4().hex[:10]}"
        self.engine: AsyncEngine | None = None
        self.sap: SapDb | None = None
        self.fed: list[str] = []
        self._numbers = itertools.count(1)
        self._broken = False

    async def start(self) -> None:
        self.engine = create_async_engine(PG_URL)
        try:
            async with self.engine.begin() as conn:
                await conn.execute(text(f'CREATE SCHEMA "{self.schema}"'))
        except OSError as exc:
            raise Unavailable(f"no PostgreSQL on 127.0.0.1:5432: {exc}") from exc
        self.sap = SapDb(self.engine, self.schema)
        await self.sap.create()

    async def stop(self) -> None:
        assert self.engine is not None
        async with self.engine.begin() as conn:
            for schema in (self.schema, f"{self.schema}_off"):
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await self.engine.dispose()

    def table(self, name: str, **over: Any) -> dict[str, Any]:
        return {
            "type": "sql",
            "url": PG_URL,
            "profile": "sap_ecc",
            "schema": self.schema,
            "include": ["work_orders"],
            "interval": "100ms",
            "retry_initial": "50ms",
            "retry_cap": "300ms",
            **over,
        }

    async def ready(self, source: Source, stored: Callable[[], list[Envelope]]) -> None:
        from tests.helpers.waiting import wait_for  # noqa: PLC0415

        def synced() -> bool:
            status = source.status()["entities"]["work_orders"]
            return status["last_successful_sync_at"] is not None

        await wait_for(synced, 30, "first SQL pass done")

    async def _orders(self, numbers: list[str], gstrp: str = "00000000") -> None:
        """Orders (AUFK, AFIH, AFKO, JEST) in ONE transaction, as SAP commits them: a
        source must never see half an order (it would store that as a version)."""
        sap, engine = self.sap, self.engine
        assert sap is not None
        assert engine is not None
        today = datetime.now(UTC).strftime("%Y%m%d")
        rows: dict[str, list[dict[str, Any]]] = {"AUFK": [], "AFIH": [], "AFKO": [], "JEST": []}
        for aufnr in numbers:
            rows["AUFK"].append(
                {
                    "AUFNR": aufnr,
                    "AUART": "PM01",
                    "AUTYP": "30",
                    "KTEXT": f"Order {aufnr}",
                    "ERDAT": "20260101",
                    "AEDAT": today,
                    "WERKS": "1000",
                    "OBJNR": f"OR{aufnr}",
                }
            )
            rows["AFIH"].append({"AUFNR": aufnr, "PRIOK": "2", "IWERK": "1000"})
            rows["AFKO"].append({"AUFNR": aufnr, "GSTRP": gstrp, "GSUZP": "000000"})
            rows["JEST"].append({"OBJNR": f"OR{aufnr}", "STAT": "I0002", "CHGNR": "001"})
        async with engine.begin() as conn:
            for table, values in rows.items():
                await conn.execute(insert(sap.table(table)), [sap.row(table, v) for v in values])

    async def feed(self, n: int = 1) -> None:
        numbers = [f"{next(self._numbers):012d}" for _ in range(n)]
        await self._orders(numbers)
        self.fed += numbers

    async def feed_bad(self) -> None:
        await self._orders([f"{next(self._numbers):012d}"], gstrp="20260230")

    def expected(self) -> set[str]:
        return {f"{n}:Order {n}" for n in self.fed}

    def key(self, record: Envelope) -> str | None:
        if record["entity_type"] != "work_order":
            return None
        return f"{record['remote_id']}:{record['data']['title']}"

    async def _rename(self, old: str, new: str) -> None:
        assert self.engine is not None
        async with self.engine.begin() as conn:
            await conn.execute(text(f'ALTER SCHEMA "{old}" RENAME TO "{new}"'))

    async def break_peer(self) -> None:
        # The tables vanish under the source: every query fails until they are back.
        await self._rename(self.schema, f"{self.schema}_off")

    async def restore_peer(self) -> None:
        await self._rename(f"{self.schema}_off", self.schema)


HARNESSES: dict[str, list[type[SourceHarness]]] = {
    # source type: the harnesses its contract runs with (one parameter each)
    "mqtt": [MqttHarness],
    "modbus": [ModbusHarness],
    "sql": [SqlHarness],
}


def parse(harness: SourceHarness, table: dict[str, Any]) -> SourceConfig:
    """The table as the config loader validates it (the registered config class)."""
    from tests.contract.registry import config_class  # noqa: PLC0415

    return config_class(harness.type).model_validate(table)
