"""The MQTT sink's contract peer: a private mosquitto, a proxy in front of it, and a
subscriber that stores what arrives (tests/contract/sink_harness.py).

What the broker does on each harness verb, for real:

* ``reject``: an ACL ``deny`` for the records' topics (the harness's topic template
  holds the record id), reloaded with SIGHUP: the broker answers PUBACK 0x87;
* ``rotate_credentials``: a new password in the broker's password file, reloaded; the
  broker drops the sink's connection and refuses the old password (CONNACK 0x87 from mosquitto 2.0);
* ``fail_next``: the proxy drops the connection when the next bytes come from the sink
  (its PUBLISH): a lost connection, MQTT's transient failure (no status, no delay);
* ``slow``: the proxy holds the broker's answers after its CONNACK (PUBACKs) that long;
* ``break_peer`` / ``restore_peer``: the broker stops and starts again on its port,
  with its persistence (the subscriber's session and what is queued for it).

MQTT has no duplicate detection, no retry-after and, with paho, no way to hear
mosquitto's "too large" PUBACK (0x95 is not a PUBACK code in MQTT 5, paho drops the
connection): the harness says so in its capability flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.helpers.mosquitto import Mosquitto
from tests.helpers.mqttsub import Subscriber
from tests.helpers.waiting import wait_for

SINK_USER = "sink"
READER = ("reader", "reader-pass")
CLIENT_ID = "contract-sink"


class Proxy:
    """127.0.0.1 TCP proxy: ``latency`` delays the broker's bytes, ``cut_next`` drops a
    connection when its client next sends."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.latency = 0.0
        self.cut_next = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(
                self._pump(reader, up_w, up=True), self._pump(up_r, writer, up=False)
            )
        except (OSError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for w in (writer, up_w):
                w.close()
            self._tasks.discard(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
        first = True
        while data := await src.read(65536):
            if up and self.cut_next and not first:
                self.cut_next = False
                raise ConnectionError("cut")
            if not up and self.latency and not first:  # the CONNACK passes
                await asyncio.sleep(self.latency)
            first = False
            dst.write(data)
            await dst.drain()
        raise ConnectionError("closed")


class MqttPeer:
    """Broker, proxy and subscriber for the harness (see the module docstring)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.password = "pass-1"
        self.denied: list[str] = []
        self.passwd = workdir / "passwd"
        self.acl = workdir / "acl"
        self._write_acl()
        self._write_passwords()
        self.broker = Mosquitto(
            workdir / "broker",
            extra=f"allow_anonymous false\npassword_file {self.passwd}\nacl_file {self.acl}\n",
        )
        self.proxy = Proxy(self.broker.port)
        self.subscriber: Subscriber | None = None

    def _write_passwords(self) -> None:
        self.passwd.write_text("")
        for user, password in ((SINK_USER, self.password), READER):
            subprocess.run(["mosquitto_passwd", "-b", str(self.passwd), user, password], check=True)
        if os.geteuid() == 0:
            self.passwd.chmod(0o600)

    def _write_acl(self) -> None:
        lines = [f"pattern deny contract/+/{rid}" for rid in self.denied]
        self.acl.write_text("\n".join([*lines, "pattern readwrite #", ""]))

    async def start(self) -> None:
        await asyncio.to_thread(self.broker.start)
        await self.proxy.start()
        self.subscriber = await asyncio.to_thread(
            Subscriber, self.broker.port, "contract/#", username=READER[0], password=READER[1]
        )

    async def stop(self) -> None:
        if self.subscriber is not None:
            await asyncio.to_thread(self.subscriber.close)
        await self.proxy.stop()
        await asyncio.to_thread(self.broker.stop)

    def table(self, **over: Any) -> dict[str, Any]:
        return {
            "type": "mqtt",
            "host": "127.0.0.1",
            "port": self.proxy.port,
            "tls": False,
            "client_id": CLIENT_ID,
            "username": SINK_USER,
            "password": self.password,
            "topic": "contract/{entity_type}/{id}",
            "payload": "record",
            "backoff_initial": "50ms",
            "backoff_cap": "200ms",
            "reauth_probe_interval": "200ms",
            "connect_timeout": "2s",
            "ack_timeout": "20s",
            **over,
        }

    def stored_ids(self) -> set[str]:
        return set(self.subscriber.record_ids()) if self.subscriber else set()

    def _reload(self) -> None:
        assert self.broker.proc is not None
        self.broker.proc.send_signal(signal.SIGHUP)

    def _probe(self, user: str, password: str, topic: str | None = None) -> int:
        """Connect (and publish to ``topic``): the CONNACK's or the PUBACK's reason code."""
        result: list[int] = []
        got = threading.Event()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"probe-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        client.username_pw_set(user, password)

        def on_connect(c: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
            if rc.value != 0 or topic is None:
                result.append(int(rc.value))
                got.set()
            else:
                c.publish(topic, b"{}", qos=1)

        def on_publish(_c: Any, _u: Any, _m: int, rc: Any, _p: Any = None) -> None:
            result.append(int(rc.value))
            got.set()

        client.on_connect = on_connect
        client.on_publish = on_publish
        try:
            client.connect("127.0.0.1", self.broker.port)
            client.loop_start()
            got.wait(5)
        finally:
            with contextlib.suppress(Exception):
                client.disconnect()
            client.loop_stop()
        return result[0] if result else -1

    async def _answers(
        self, codes: set[int], user: str, password: str, topic: str | None = None
    ) -> bool:
        return await asyncio.to_thread(self._probe, user, password, topic) in codes

    async def reject(self, pattern: str) -> None:
        self.denied = pattern.split("|")
        self._write_acl()
        self._reload()
        topic = f"contract/meter_reading/{self.denied[0]}"
        await wait_for(
            lambda: self._answers({0x87}, *READER, topic=topic), 30, "the broker applies the ACL"
        )

    async def fail_next(self) -> None:
        self.proxy.cut_next = True

    async def rotate_credentials(self) -> None:
        old = self.password
        self.password = "pass-" + str(int(old.split("-")[1]) + 1)
        self._write_passwords()
        self._reload()
        await wait_for(
            lambda: self._answers({0x86, 0x87}, SINK_USER, old),
            30,
            "the broker refuses the old password",
        )

    async def slow(self, seconds: float) -> None:
        self.proxy.latency = seconds

    async def break_peer(self) -> None:
        await asyncio.to_thread(self.broker.stop)

    async def restore_peer(self) -> None:
        await asyncio.to_thread(self.broker.start)
