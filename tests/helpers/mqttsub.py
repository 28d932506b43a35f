"""A subscriber (paho, its own thread) that keeps every message a broker delivers.

Persistent session (MQTT 5, ``clean_start`` false, a day's expiry) and QoS 1, so what is
published while it is away, or while the broker restarts, reaches it afterwards. It
reconnects by itself.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass(frozen=True, slots=True)
class Received:
    """One message as it arrived."""

    topic: str
    payload: bytes


class Subscriber:
    """``Subscriber(port, "edge/#")``: every message on the filter, in arrival order."""

    def __init__(
        self,
        port: int,
        topic_filter: str,
        *,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
    ) -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._filter = topic_filter
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"sub-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 86400
        self._subscribed = threading.Event()
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise TimeoutError("subscriber: no SUBACK")

    def _on_connect(self, client: paho.Client, *_: object) -> None:
        client.subscribe(self._filter, qos=1)
        self._subscribed.set()

    def _on_message(self, _client: object, _ud: object, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(message.topic, bytes(message.payload)))

    def received(self) -> list[Received]:
        """A copy of what arrived so far."""
        with self._lock:
            return list(self.messages)

    def record_ids(self) -> list[str]:
        """Every record id received, with repeats: a message is one envelope or a batch
        (``{"records": [...]}``)."""
        ids: list[str] = []
        for message in self.received():
            body = orjson.loads(message.payload)
            for record in body.get("records", [body]) if isinstance(body, dict) else []:
                if isinstance(record, dict) and "id" in record:
                    ids.append(str(record["id"]))
        return ids

    def close(self) -> None:
        """Disconnect (the broker keeps the session) and stop the thread."""
        self.client.disconnect()
        self.client.loop_stop()
