"""A door fault raised during an upstream outage, through the whole daemon.

Real broker (private mosquitto), the MQTT source with the lift profile and a rule, the
outbox, the forwarder and the reference receiver. The receiver is down while the fault is
raised and the broker redelivers the same message: after recovery the receiver holds
exactly one maintenance request, once, after the reading that raised it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent import config as cfg
from tests.agent_harness import running_agent
from tests.helpers.mosquitto import Mosquitto
from tests.helpers.mqttpub import Publisher
from tests.helpers.waiting import wait_for
from tests.upstream_support import TOKEN, receiver_fixture  # noqa: F401

TOPIC = "site/berlin/lift/L7/state"


def settings(tmp: Path, mqtt_port: int, upstream: str) -> cfg.Settings:
    data: dict[str, Any] = {
        "agent": {"id": "gw-lift", "site": "berlin", "state_dir": str(tmp / "state")},
        "api": {"enabled": False},
        "upstream": {
            "url": upstream,
            "token": TOKEN,
            "backoff_initial": "50ms",
            "backoff_cap": "300ms",
            "drain_timeout": "5s",
        },
        "sources": {
            "lifts": {
                "type": "mqtt",
                "host": "127.0.0.1",
                "port": mqtt_port,
                "client_id": "lift-delivery",
                "reconnect_initial": "50ms",
                "reconnect_cap": "500ms",
                "subscriptions": [
                    {
                        "topic": "site/{site}/lift/{asset}/state",
                        "profile": "lift_generic",
                        "asset": "{asset}",
                        "site": "{site}",
                        "timestamp_path": "ts",
                    }
                ],
                "rules": [
                    {
                        "name": "door_fault",
                        "type": "state",
                        "point": "fault",
                        "values": ["door_fault", "door_lock_fault"],
                        "severity": "major",
                        "maintenance_request": {
                            "title": "Door fault on {asset}",
                            "priority": "high",
                        },
                    }
                ],
            }
        },
    }
    return cfg.parse(data)[0]


def stored(rx: Any) -> list[dict[str, Any]]:
    rows = rx.store._db.execute("SELECT body FROM records ORDER BY arrival").fetchall()
    return [orjson.loads(b) for (b,) in rows]


@pytest.mark.slow
async def test_request_raised_during_an_outage_arrives_once_and_in_order(
    mosquitto: Mosquitto, receiver: Any, tmp_path: Path
) -> None:
    async with running_agent(settings(tmp_path, mosquitto.port, receiver.url)) as agent:
        await wait_for(
            lambda: agent.slots["lifts"].status()["state"] == "ok", what="mqtt subscribed"
        )
        with Publisher(mosquitto.port) as pub:
            pub.publish(TOPIC, json.dumps({"ts": 1790000000, "fault": 0, "position": 3}))
            await wait_for(lambda: receiver.store.count() >= 1, what="first reading")
            await receiver.stop()  # the WAN goes down
            raise_msg = json.dumps({"ts": 1790000010, "fault": 1, "position": 4})
            pub.publish(TOPIC, raise_msg)
            pub.publish(TOPIC, raise_msg)  # a redelivery of the same message
            pub.publish(TOPIC, json.dumps({"ts": 1790000020, "fault": 2, "position": 4}))
            await wait_for(lambda: agent.slots["lifts"].records >= 5, what="fault buffered")
            assert (await agent.status())["upstream"]["state"] == "retrying"
            await receiver.start()  # the WAN is back
            await wait_for(
                lambda: any(r["entity_type"] == "maintenance_request" for r in stored(receiver)),
                what="maintenance request delivered",
            )
            pub.publish(TOPIC, json.dumps({"ts": 1790000030, "fault": 0, "position": 5}))
            await wait_for(
                lambda: any(r["data"].get("state") == "cleared" for r in stored(receiver)),
                what="fault cleared upstream",
            )
        await wait_for(lambda: sum((agent.outbox._rows).values()) == 0, what="outbox empty")
    got = stored(receiver)
    requests = [r for r in got if r["entity_type"] == "maintenance_request"]
    assert len(requests) == 1, requests
    assert requests[0]["data"]["status"] == "open"
    assert requests[0]["source"]["site"] == "berlin"
    by_seq = sorted(got, key=lambda r: r["seq"])
    i = next(k for k, r in enumerate(by_seq) if r["data"].get("code") == "door_fault")
    assert by_seq[i + 1]["data"].get("rule") == "door_fault"  # the raised event ...
    assert by_seq[i + 1]["data"].get("state") == "raised"
    assert by_seq[i + 2]["entity_type"] == "maintenance_request"  # ... then the request
    assert receiver.store.order_violations() == []
    events = [r for r in got if r["entity_type"] == "event" and r["data"].get("rule")]
    assert [r["data"]["state"] for r in events] == ["raised", "cleared"]
