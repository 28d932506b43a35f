"""One harness per sink type: a real upstream peer that can misbehave on demand.

A harness owns its peer on 127.0.0.1 and can make it refuse chosen records, fail the
next request transiently (asking for a delay), refuse batches over a size, refuse the
current credentials, answer late, and go away and come back. The sink contract suite
(tests/contract/test_sink_contract.py) runs every case through these verbs, so a new sink
type passes by adding one harness class and its line in :data:`SINK_HARNESSES`.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import pytest

from agent.receiver import Receiver, Store
from tests.contract.mqtt_sink_peer import MqttPeer
from tests.helpers.natsserver import (
    LateProxy,
    NatsServer,
    have_nats_server,
    refused,
    stored_sync,
)


class SinkHarness(abc.ABC):
    """A sink type's upstream peer; see the module docstring."""

    type: ClassVar[str]
    """The registered sink type (``upstream.type``) this harness drives."""
    knows_duplicates: ClassVar[bool] = True
    """The peer tells a record it had already (HTTP, JetStream). MQTT cannot: a record
    sent again is accepted again (consumers dedupe by id)."""
    transient_detail: ClassVar[bool] = True
    """A transient failure carries a status and a delay (HTTP 503 + Retry-After). A lost
    MQTT connection carries neither."""
    limits_batches: ClassVar[bool] = True
    """``limit_batch`` makes the peer refuse large batches as too large. The MQTT sink
    sizes its messages itself (``max_message_bytes``): tests/test_mqtt_sink.py."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the peer."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop it for good."""

    @abc.abstractmethod
    def table(self, **over: Any) -> dict[str, Any]:
        """An ``[upstream]`` table for this peer with its current credentials."""

    @abc.abstractmethod
    def stored_ids(self) -> set[str]:
        """Ids of every record the peer holds."""

    @abc.abstractmethod
    async def reject(self, pattern: str) -> None:
        """Refuse records whose id or remote id match ``pattern`` (one by one)."""

    @abc.abstractmethod
    async def fail_next(self, retry_after: int) -> None:
        """Fail the next request transiently, asking for ``retry_after`` seconds."""

    @abc.abstractmethod
    async def limit_batch(self, max_bytes: int) -> None:
        """Refuse any batch larger than ``max_bytes`` as too large."""

    @abc.abstractmethod
    async def rotate_credentials(self) -> None:
        """Accept only new credentials from now on (:meth:`table` has them)."""

    @abc.abstractmethod
    async def slow(self, seconds: float) -> None:
        """Answer every request ``seconds`` late."""

    @abc.abstractmethod
    async def break_peer(self) -> None:
        """Take the peer away (connections refused)."""

    @abc.abstractmethod
    async def restore_peer(self) -> None:
        """Bring it back (same address, same store)."""


class HttpHarness(SinkHarness):
    """The reference receiver (agent/receiver.py) in-process, faults set directly."""

    type = "http"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.token = "contract-token-1"
        self.store = Store(workdir / "receiver.db")
        self.rx = Receiver(self.store, self.token)

    async def start(self) -> None:
        await self.rx.start()

    async def stop(self) -> None:
        await self.rx.stop()
        self.store.close()

    def table(self, **over: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "url": f"http://127.0.0.1:{self.rx.port}",
            "token": self.token,
            "backoff_initial": "50ms",
            "backoff_cap": "200ms",
            "reauth_probe_interval": "200ms",
            "connect_timeout": "2s",
            "read_timeout": "20s",
            **over,
        }

    def stored_ids(self) -> set[str]:
        return self.store.ids()

    async def reject(self, pattern: str) -> None:
        self.rx.faults.update({"reject_pattern": pattern, "reject_mode": "record"})

    async def fail_next(self, retry_after: int) -> None:
        self.rx.faults.update({"status": 503, "status_count": 1, "retry_after": str(retry_after)})

    async def limit_batch(self, max_bytes: int) -> None:
        self.rx.faults.update({"max_body_bytes": max_bytes})

    async def rotate_credentials(self) -> None:
        self.token = self.rx.token = self.token[:-1] + str(int(self.token[-1]) + 1)

    async def slow(self, seconds: float) -> None:
        self.rx.faults.update({"latency": seconds})

    async def break_peer(self) -> None:
        await self.rx.stop()

    async def restore_peer(self) -> None:
        await self.rx.start()


class MqttHarness(SinkHarness):
    """mosquitto behind a proxy, with a subscriber (tests/contract/mqtt_sink_peer.py)."""

    type = "mqtt"
    knows_duplicates = False
    transient_detail = False
    limits_batches = False

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.peer = MqttPeer(workdir)

    async def start(self) -> None:
        await self.peer.start()

    async def stop(self) -> None:
        await self.peer.stop()

    def table(self, **over: Any) -> dict[str, Any]:
        return self.peer.table(**over)

    def stored_ids(self) -> set[str]:
        return self.peer.stored_ids()

    async def reject(self, pattern: str) -> None:
        await self.peer.reject(pattern)

    async def fail_next(self, retry_after: int) -> None:
        del retry_after  # MQTT has no way to ask for a delay
        await self.peer.fail_next()

    async def limit_batch(self, max_bytes: int) -> None:
        raise NotImplementedError("see limits_batches")

    async def rotate_credentials(self) -> None:
        await self.peer.rotate_credentials()

    async def slow(self, seconds: float) -> None:
        await self.peer.slow(seconds)

    async def break_peer(self) -> None:
        await self.peer.break_peer()

    async def restore_peer(self) -> None:
        await self.peer.restore_peer()


class NatsHarness(SinkHarness):
    """A private ``nats-server -js`` with token auth, reached through a proxy that can
    answer late or go away (the server and its stream stay readable directly).

    A transient failure is the proxy cutting the connection at the next publish.
    JetStream has no way to refuse chosen records (only a record over the stream's
    ``max_msg_size``, alone: tests/test_nats_sink.py), so that case is skipped here;
    tests/test_nats_sink.py covers it, duplicates by ``Nats-Msg-Id``, a missing stream.
    """

    type = "nats"
    stream = "CONTRACT"
    transient_detail = False  # a lost connection or publish carries no delay
    limits_batches = False  # each record is one message; too large ones: test_nats_sink

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        if not have_nats_server():
            pytest.skip("nats-server not installed (apt-get install nats-server)")
        self.server = NatsServer(workdir / "nats", token="contract-token-1")
        self.proxy: LateProxy | None = None

    async def start(self) -> None:
        self.server.start()
        self.proxy = LateProxy(self.server.port)
        await self.proxy.start()

    async def stop(self) -> None:
        if self.proxy is not None:
            await self.proxy.stop()
        self.server.stop()

    def table(self, **over: Any) -> dict[str, Any]:
        assert self.proxy is not None
        return {
            "type": "nats",
            "servers": [f"nats://127.0.0.1:{self.proxy.port}"],
            "stream": self.stream,
            "subject": "contract.{site}.{entity_type}",
            "create_stream": True,
            "token": self.server.token,
            "backoff_initial": "50ms",
            "backoff_cap": "200ms",
            "reauth_probe_interval": "200ms",
            "connect_timeout": "2s",
            "ack_timeout": "20s",
            **over,
        }

    def stored_ids(self) -> set[str]:
        return set(stored_sync([self.server.url], self.stream, self.server.token))

    async def reject(self, pattern: str) -> None:
        pytest.skip("JetStream cannot refuse chosen records (only a too large one)")

    async def fail_next(self, retry_after: int) -> None:
        del retry_after  # NATS has no way to ask for a delay
        assert self.proxy is not None
        self.proxy.cut_next_publish = True

    async def limit_batch(self, max_bytes: int) -> None:
        raise NotImplementedError("see limits_batches")

    async def rotate_credentials(self) -> None:
        token = self.server.token or "contract-token-1"
        self.server.token = token[:-1] + str(int(token[-1]) + 1)
        self.server.reload()
        await refused(self.server.url, token)  # the reload is done: the old token fails

    async def slow(self, seconds: float) -> None:
        assert self.proxy is not None
        self.proxy.delay = seconds

    async def break_peer(self) -> None:
        assert self.proxy is not None
        await self.proxy.stop()

    async def restore_peer(self) -> None:
        assert self.proxy is not None
        await self.proxy.start()


SINK_HARNESSES: dict[str, list[type[SinkHarness]]] = {
    # upstream.type: the harnesses its contract runs with (one parameter each)
    "http": [HttpHarness],
    "mqtt": [MqttHarness],
    "nats": [NatsHarness],
}
