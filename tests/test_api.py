"""The local API, running inside a real agent, checked against docs/local-api.openapi.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from agent.errors import ConfigError
from agent.outbox import Quarantined
from tests.agent_harness import running_agent, settings_for
from tests.helpers.waiting import free_port, wait_for
from tests.outbox_helpers import work_order

SPEC = json.loads((Path(__file__).parents[1] / "docs" / "local-api.openapi.json").read_text())
API_TOKEN = "local-api-secret"


def schema_for(path: str, method: str, status: int) -> dict[str, Any] | None:
    responses = SPEC["paths"][path][method]["responses"]
    content = responses[str(status)].get("content", {})
    schema = content.get("application/json", {}).get("schema")
    if schema is None:
        return None
    return {**schema, "components": SPEC["components"]}


def check(resp: httpx.Response, path: str, method: str = "get") -> None:
    assert str(resp.status_code) in SPEC["paths"][path][method]["responses"], resp.text
    assert resp.headers["x-api-version"] == "1"
    assert resp.headers["x-request-id"]
    schema = schema_for(path, method, resp.status_code)
    if schema is not None:
        ref_schema = json.loads(json.dumps(schema).replace("#/components", "#/components"))
        jsonschema.validate(resp.json(), ref_schema)


@pytest.fixture
def settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    return settings_for(tmp_path, api={"token": API_TOKEN, "ready_max_oldest_age": "1h"})


async def test_every_endpoint_matches_the_openapi_document(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    async with running_agent(settings) as agent:
        await agent.outbox.append([work_order("WO1")])
        await agent.outbox.quarantine([Quarantined("mqtt1", "not_json", {"topic": "a"}, b"x")])
        base = f"http://{settings.api.listen}"
        async with httpx.AsyncClient(base_url=base) as http:
            for path in ("/healthz", "/readyz", "/v1/status", "/v1/sync-status"):
                check(await http.get(path), path)
            r = await http.get("/v1/status", headers={"X-Request-ID": "abc-123"})
            assert r.headers["x-request-id"] == "abc-123"
            status = r.json()
            assert status["outbox"]["rows"]["business"] == 1
            assert status["agent_id"] == "test-agent"
            m = await http.get("/metrics")
            check(m, "/metrics")
            assert 'edge_agent_outbox_rows{class="business"} 1.0' in m.text
            assert 'edge_agent_quarantined_total{reason="not_json",source="mqtt1"} 1.0' in m.text
            assert "edge_agent_outbox_oldest_age_seconds" in m.text
            sync = "/v1/sources/{name}/sync"
            r = await http.post("/v1/sources/nope/sync", json={})
            assert r.status_code == 401
            check(r, sync, "post")
            auth = {"Authorization": f"Bearer {API_TOKEN}"}
            r = await http.post("/v1/sources/nope/sync", json={"full": True}, headers=auth)
            assert r.status_code == 404
            check(r, sync, "post")
            r = await http.post("/v1/sources/nope/sync", content=b"{", headers=auth)
            assert r.status_code == 400
            check(r, sync, "post")
            r = await http.post("/v1/sources/nope/sync", json={"full": "yes"}, headers=auth)
            assert r.status_code == 400


async def test_mutations_are_refused_without_a_configured_token(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    async with running_agent(settings), httpx.AsyncClient() as http:
        r = await http.post(f"http://{settings.api.listen}/v1/sources/x/sync", json={})
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "mutations_disabled"


async def test_secrets_never_appear_in_status_or_metrics(settings) -> None:  # type: ignore[no-untyped-def]
    async with running_agent(settings), httpx.AsyncClient() as http:
        base = f"http://{settings.api.listen}"
        for path in ("/v1/status", "/metrics", "/readyz", "/v1/sync-status"):
            text = (await http.get(base + path)).text
            assert API_TOKEN not in text
            assert "upstream-secret-token" not in text


def test_binding_beyond_loopback_requires_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a loopback address"):
        settings_for(tmp_path, api={"listen": "0.0.0.0:8470"})
    ok = settings_for(tmp_path, api={"listen": "0.0.0.0:8470", "token": "t"})
    assert ok.api.listen == "0.0.0.0:8470"
    assert settings_for(tmp_path, api={"listen": "[::1]:8470"}).api.listen == "[::1]:8470"


async def test_readyz_says_not_ready_while_the_mqtt_broker_is_unreachable(
    tmp_path: Path,
) -> None:
    """A real agent with an MQTT source whose broker does not listen."""
    dead = free_port()
    settings = settings_for(
        tmp_path,
        api={"token": API_TOKEN},
        sources={
            "plant": {
                "type": "mqtt",
                "host": "127.0.0.1",
                "port": dead,
                "client_id": "ready-test",
                "reconnect_initial": "100ms",
                "subscriptions": [
                    {
                        "topic": "a/{asset}",
                        "asset": "{asset}",
                        "points": [{"name": "v", "path": "v"}],
                    }
                ],
            }
        },
    )
    async with running_agent(settings) as agent:
        base = f"http://{settings.api.listen}"
        async with httpx.AsyncClient(base_url=base) as http:
            retrying = "source plant is retrying (reconnecting): "
            r = await wait_for(
                lambda: _readyz_if(http, 503, retrying), what="503 from /readyz", timeout=20
            )
            check(r, "/readyz")
            body = r.json()
            assert body["ready"] is False
            assert agent.slots["plant"].status()["state"] == "retrying"


async def _readyz_if(
    http: httpx.AsyncClient, code: int, reason: str = ""
) -> httpx.Response | None:
    """The /readyz answer once it has ``code`` and a reason starting with ``reason``."""
    r = await http.get("/readyz")
    if r.status_code != code:
        return None
    return r if not reason or any(x.startswith(reason) for x in r.json()["reasons"]) else None
