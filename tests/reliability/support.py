"""Shared machinery of the reliability suites (tests/reliability).

Everything here is a real peer on 127.0.0.1: the agent as a subprocess (``python -m
agent run``), the reference receiver as a subprocess (``python -m agent receiver``, faults
through ``POST /v1/_faults``), a private mosquitto, pymodbus's server, PostgreSQL. The
suites are synchronous: the peers run in other processes or threads, so a test can block
(wait for a subprocess, publish and wait for PUBACK) without stalling any of them.

Parameters come from the environment so that ``scripts/soak`` can run the same tests
longer; the defaults are the CI-sized run:

* ``RELIABILITY_KILLS`` (20): SIGKILLs in the crash loop;
* ``RELIABILITY_SEED`` (random, printed): seed of every random choice;
* ``RELIABILITY_SCALE`` (1): multiplies message counts of the outage and fault suites;
* ``RELIABILITY_REPORT`` (unset): a file each suite appends one JSON line of figures to.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from agent.records import SourceRef
from agent.sources.mqtt import MqttConfig
from agent.sources.mqtt.mapping import Mapper
from tests.agent_process import toml_dumps
from tests.helpers import waiting
from tests.helpers.agentproc import AgentProcess
from tests.helpers.mqttpub import Publisher
from tests.helpers.waiting import free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "rel-ingest-token"
ADMIN = "rel-admin-token"
SITE = "rel-site"
DEADLINE = float(os.environ.get("RELIABILITY_DEADLINE", "180"))  # generous: loaded 2-core CI


def kills() -> int:
    """How many SIGKILLs the crash loop delivers."""
    return int(os.environ.get("RELIABILITY_KILLS", "20"))


def scale() -> float:
    """Multiplier of message counts (soak runs raise it)."""
    return float(os.environ.get("RELIABILITY_SCALE", "1"))


def seeded(name: str) -> random.Random:
    """A random generator whose seed is printed (and so can be replayed)."""
    seed = int(os.environ.get("RELIABILITY_SEED", str(random.SystemRandom().randrange(1 << 30))))
    print(f"\n{name}: RELIABILITY_SEED={seed}")
    return random.Random(seed)


def report(suite: str, **figures: Any) -> None:
    """Print the figures of a run and append them to ``$RELIABILITY_REPORT`` if set."""
    line = {"suite": suite, "at": datetime.now(UTC).isoformat(timespec="seconds"), **figures}
    print(json.dumps(line))
    path = os.environ.get("RELIABILITY_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(line) + "\n")


def wait_until(
    condition: Callable[[], Any],
    what: str,
    timeout: float = DEADLINE,
    detail: Callable[[], Any] | None = None,
) -> Any:
    """:func:`tests.helpers.waiting.wait_until` with this suite's default deadline."""
    return waiting.wait_until(condition, what, timeout, detail)


# ---------------------------------------------------------------------- receiver


class ReceiverProc:
    """The reference receiver in its own process, on a fixed port (restartable)."""

    def __init__(self, workdir: Path, token: str = TOKEN) -> None:
        self.db = workdir / "receiver.db"
        self.log = workdir / "receiver.log"
        self.token = token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ReceiverProc:
        """Start and wait until /healthz answers."""
        cmd = [sys.executable, "-m", "agent", "receiver", "--listen", f"127.0.0.1:{self.port}",
               "--db", str(self.db), "--token", self.token, "--admin-token", ADMIN]  # fmt: skip
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        wait_port(self.port, timeout=60)
        wait_until(self._healthy, "receiver healthy", 60)
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL (a WAN cut, from the agent's side: connection refused)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def faults(self, **changes: Any) -> dict[str, Any]:
        """``POST /v1/_faults`` (``reset=True`` clears every fault first)."""
        answer = httpx.post(
            self.url + "/v1/_faults",
            json=changes,
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=10,
        )
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result

    def stats(self) -> dict[str, Any]:
        """``GET /v1/stats``."""
        answer = httpx.get(
            self.url + "/v1/stats", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
        )
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result

    def rows(self) -> list[dict[str, Any]]:
        """Every stored record in arrival order (read from the file, beside the server)."""
        if not self.db.exists():
            return []
        con = sqlite3.connect(self.db, timeout=30)
        try:
            raw = con.execute("SELECT arrival, body FROM records ORDER BY arrival").fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            con.close()
        return [{**json.loads(body), "_arrival": arrival} for arrival, body in raw]

    def ids(self) -> set[str]:
        """Every stored record id."""
        return {r["id"] for r in self.rows()}

    def order_violations(self) -> list[str]:
        """Entities whose records arrived out of outbox ``seq`` order."""
        last: dict[str, int] = {}
        bad: set[str] = set()
        for r in self.rows():
            seq = r.get("seq")
            if seq is None:
                continue
            if r["entity_id"] in last and seq <= last[r["entity_id"]]:
                bad.add(r["entity_id"])
            last[r["entity_id"]] = seq
        return sorted(bad)


# ---------------------------------------------------------------------- agent


class Agent(AgentProcess):
    """The agent as a subprocess (:class:`tests.helpers.agentproc.AgentProcess`), its
    config written from a dict, with its local API on a private port."""

    def __init__(self, workdir: Path, config: dict[str, Any], **env: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        config_file = workdir / "config.toml"
        self._write(config_file, config)
        super().__init__(config_file, workdir / "agent.log", **env)

    def _write(self, path: Path, config: dict[str, Any]) -> None:
        config = {**config, "api": {**config.get("api", {}), "listen": f"127.0.0.1:{self.port}"}}
        path.write_text(toml_dumps(config) + "\n")

    def write_config(self, config: dict[str, Any]) -> None:
        """(Re)write the config file (the API port stays this agent's)."""
        self._write(self.config_file, config)


def integrity_check(db: Path) -> str:
    """``PRAGMA integrity_check`` of the outbox file (between kills: nothing else has it)."""
    if not db.exists():
        return "ok"
    con = sqlite3.connect(db, timeout=30)
    try:
        return "; ".join(r[0] for r in con.execute("PRAGMA integrity_check"))
    finally:
        con.close()


# ---------------------------------------------------------------------- config


def agent_config(
    workdir: Path, upstream_url: str, *, token: str = TOKEN, **sections: Any
) -> dict[str, Any]:
    """A config with fast retries (tests wait for conditions, never for fixed times)."""
    data: dict[str, Any] = {
        "agent": {"id": "rel-agent", "site": SITE, "state_dir": str(workdir / "state")},
        "logging": {"level": "info", "format": "json"},
        "outbox": {"max_bytes": "64MiB"},
        "upstream": {
            "url": upstream_url,
            "token": token,
            "backoff_initial": "50ms",
            "backoff_cap": "500ms",
            "reauth_probe_interval": "1s",
            "connect_timeout": "2s",
            "read_timeout": "10s",
            "batch_max_records": 200,
            "drain_timeout": "30s",
        },
        "api": {},
        "sources": {},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def mqtt_source(port: int, client_id: str, topic: str = "rel/{asset}/v") -> dict[str, Any]:
    """An MQTT source: QoS 1, payload ``{"ts": epoch seconds, "v": number}`` per asset."""
    return {
        "type": "mqtt",
        "host": "127.0.0.1",
        "port": port,
        "client_id": client_id,
        "reconnect_initial": "100ms",
        "reconnect_cap": "1s",
        "subscriptions": [
            {
                "topic": topic,
                "asset": "{asset}",
                "timestamp_path": "ts",
                "points": [{"name": "v", "path": "v"}],
            }
        ],
    }


MQTT_REF = SourceRef("plant", "mqtt", SITE)


@functools.lru_cache(maxsize=8)
def _mapper(ref: SourceRef, source: str) -> Mapper:
    return Mapper(ref, MqttConfig.model_validate(json.loads(source)))


def reading_id(
    asset: str, ts: float, ref: SourceRef = MQTT_REF, source: dict[str, Any] | None = None
) -> str:
    """The deterministic id the agent gives the reading of message (asset, ts), i.e. of
    ``message(ts - T0)``, under the MQTT ``source`` config (default :func:`mqtt_source`):
    mapped by the agent's own mapper, since the id covers the value too."""
    got, topic, payload = message(int(ts - T0))
    assert got == asset, f"message at {ts} is of {got}, not {asset}"
    config = json.dumps(source or mqtt_source(1883, "ids"), sort_keys=True)
    now = datetime.now(UTC)  # not used: the message carries its time
    (record,) = _mapper(ref, config).map(topic, payload.encode(), now).records
    return record.id


T0 = 1_800_000_000  # payload timestamps: T0 + sequence number (seconds)


def message(seq: int) -> tuple[str, str, str]:
    """Message number ``seq``: (asset, topic, payload); ids are stable across redelivery."""
    asset = f"A{seq % 7}"
    return asset, f"rel/{asset}/v", json.dumps({"ts": T0 + seq, "v": seq})


class PublisherThread:
    """Publishes sequence-numbered QoS 1 messages in the background until stopped."""

    def __init__(self, port: int, start: int = 0, rate: float = 200.0) -> None:
        self.port = port
        self.next = start
        self.rate = rate
        self.sent: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> PublisherThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[int]:
        """Stop and return every sequence number the broker acknowledged."""
        self._stop.set()
        self._thread.join(60)
        if self.error is not None:
            raise AssertionError(f"publisher failed: {self.error!r}")
        return self.sent

    def _run(self) -> None:
        try:
            with Publisher(self.port) as pub:
                chunk = max(1, int(self.rate / 10))
                while not self._stop.is_set():
                    seqs = list(range(self.next, self.next + chunk))
                    pub.publish_many(message(s)[1:] for s in seqs)
                    self.sent += seqs
                    self.next += chunk
                    self._stop.wait(0.1)  # pacing the producer, not waiting for a condition
        except BaseException as exc:  # reported by stop()
            self.error = exc


class LoopThread:
    """An event loop in a thread: sync tests drive asyncpg through it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop and join the thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


class PgSchema:
    """A private PostgreSQL schema with a CMMS-like ``wo`` table (dropped on close)."""

    def __init__(self) -> None:
        import asyncpg  # noqa: PLC0415

        self.name = f"rel_{uuid.uuid4().hex[:10]}"
        self.loop = LoopThread()
        self.con: Any = self.loop.run(asyncpg.connect(PG_DSN))
        self.execute(f'CREATE SCHEMA "{self.name}"')
        self.execute(
            f'CREATE TABLE "{self.name}".wo (wonum TEXT PRIMARY KEY, descr TEXT, '
            "version INTEGER NOT NULL, changed_at TIMESTAMP NOT NULL)"
        )

    def execute(self, sql: str, *args: Any) -> Any:
        """Run one statement."""
        return self.loop.run(self.con.execute(sql, *args))

    def fetch(self, sql: str, *args: Any) -> list[Any]:
        """Rows of a query."""
        return list(self.loop.run(self.con.fetch(sql, *args)))

    def close(self) -> None:
        """Drop the schema and disconnect."""
        with contextlib.suppress(Exception):
            self.execute(f'DROP SCHEMA "{self.name}" CASCADE')
        self.loop.run(self.con.close())
        self.loop.close()

    def source(self, interval: str = "300ms") -> dict[str, Any]:
        """A declarative SQL source reading ``wo`` (title = descr)."""
        return {
            "type": "sql",
            "profile": "declarative",
            "url": "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
            "interval": interval,
            "initial_window": "3650d",
            "retry_initial": "200ms",
            "retry_cap": "2s",
            "entities": {
                "work_orders": {
                    "entity_type": "work_order",
                    "table": f"{self.name}.wo",
                    "key": ["wonum"],
                    "cursor": "changed_at",
                    "fields": {"title": "descr"},
                }
            },
        }
