"""The status page at ``/`` (agent.statuspage): escaped, readable without JavaScript,
its assets from the package, the token rules of reads (a session cookie from a form, never
a token in the URL, never the cookie for a mutation)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx

from agent import statuspage
from tests.agent_harness import running_agent, settings_for

EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'
TOKEN = "page-token-123"


class Tags(HTMLParser):
    """Every start tag with its attributes (a real HTML parser, not a regex)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Tags()
    parser.feed(html)
    return parser.tags


def evil_status() -> dict[str, Any]:
    """A status whose every peer-given or configured text is hostile markup."""
    part = {"kind": "device", "state": "retrying", "reason": EVIL, "since": 0, "detail": EVIL}
    return {
        "agent_id": EVIL,
        "version": EVIL,
        "uptime_seconds": 5,
        "readiness": {"ready": False, "reasons": [EVIL], "warnings": [EVIL]},
        "sources": {
            EVIL: {
                "type": "modbus",
                "state": "degraded",
                "reason": EVIL,
                "detail": EVIL,
                "records": 3,
                "last_error": EVIL,
                "parts": {EVIL: part},
                "devices": {EVIL: {**part, "unit_id": EVIL, "last_error": EVIL}},
            },
            "sql": {
                "type": "sql",
                "state": "ok",
                "entities": {EVIL: {"status": EVIL, "error": EVIL, "progress": {"rows": 1}}},
            },
            "feed": {"type": "mqtt", "state": "ok", "broker": EVIL},
        },
        "upstream": {
            "last_request_id": EVIL,
            "last_error": EVIL,
            "url": EVIL,
            "health": {"state": "retrying", "reason": EVIL},
        },
        "outbox": {
            "rows": {EVIL: 1},
            "dropped": {EVIL: 2},
            "reason": EVIL,
            "state": "ok",
            "horizon": {"text": EVIL, "classes": {EVIL: {"then": EVIL}}},
        },
        "flow": {"ingest": [1, 2], "delivered": [0, 1]},
    }


def test_everything_from_config_and_peers_is_escaped() -> None:
    html = statuspage.render(evil_status())
    found = tags(html)
    assert [t for t, _ in found if t == "script"] == ["script"]  # only status.js
    assert all(t != "img" for t, _ in found)
    assert not any(k.startswith("on") for _, attrs in found for k in attrs)
    assert "<script>alert" not in html
    assert html.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") >= 15
    # Names in attributes (data-shape, data-k) stay inside their quoted values: the
    # parser above saw no tag or handler of theirs; the raw HTML has them escaped.
    assert 'data-shape="&lt;script&gt;' in html


def test_the_page_is_readable_without_javascript_and_on_a_phone() -> None:
    html = statuspage.render(evil_status())
    assert f'<meta http-equiv="refresh" content="{statuspage.REFRESH_SECONDS * 2}">' in html
    assert 'name="viewport" content="width=device-width, initial-scale=1"' in html
    # The numbers are in the HTML itself, not filled in by the script.
    assert re.search(r'data-f="int">3</span>', html)
    srcs = [a.get("src") or a.get("href") for t, a in tags(html) if t in {"script", "link"}]
    assert srcs == ["/static/status.css", "/static/status.js"]  # no CDN


def test_formats() -> None:
    assert statuspage.duration(0) == "0s"
    assert statuspage.duration(59) == "59s"
    assert statuspage.duration(3725) == "1h2m"
    assert statuspage.duration(9 * 86400 + 7200 + 5) == "9d2h"
    assert statuspage.fmt(1234567, "int") == "1,234,567"
    assert statuspage.fmt(None, "int") == "-"
    assert statuspage.fmt(100.0, "ago", now=160.0) == "1m ago"
    assert statuspage.fmt("1970-01-01T00:02:40+00:00", "in", now=100.0) == "in 1m"
    assert statuspage.fmt(1536, "bytes") == "1.5 KiB"


async def test_served_with_its_assets_and_headers(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    async with running_agent(settings), httpx.AsyncClient() as http:
        base = f"http://{settings.api.listen}"
        page = await http.get(base + "/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-request-id"]
        assert "test-agent" in page.text
        assert 'id="horizon"' in page.text
        for name, media in statuspage.ASSETS.items():
            r = await http.get(f"{base}/static/{name}")
            assert r.status_code == 200
            assert r.headers["content-type"] == media
            assert r.content == statuspage.asset(name)
        assert (await http.get(base + "/static/../api.py")).status_code == 404
        assert (await http.get(base + "/static/nope.js")).status_code == 404


async def test_with_tokens_for_reads_the_page_needs_a_login(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, api={"token": TOKEN, "require_token_for_reads": True})
    base = f"http://{settings.api.listen}"
    async with running_agent(settings), httpx.AsyncClient(base_url=base) as http:
        form = await http.get("/")
        assert form.status_code == 401
        assert '<form method="post" action="/login">' in form.text
        assert "test-agent" not in form.text  # nothing of the status before the login
        assert (await http.get("/static/status.css")).status_code == 200  # the form's style
        # A token in the URL is refused, even the right one: URLs land in logs.
        in_url = await http.get("/", params={"token": TOKEN})
        assert in_url.status_code == 400
        assert "test-agent" not in in_url.text
        huge = await http.post("/login", content=b"token=" + b"x" * 100_000)
        assert huge.status_code == 413
        wrong = await http.post("/login", data={"token": "nope"})
        assert wrong.status_code == 401
        assert statuspage.COOKIE not in wrong.headers.get("set-cookie", "")
        ok = await http.post("/login", data={"token": TOKEN})
        assert ok.status_code == 303
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "samesite=strict" in cookie.lower()
        assert TOKEN not in cookie  # an HMAC of the token, not the token
        http.cookies.clear()  # sent by hand below, one request at a time
        session = {"cookie": f"{statuspage.COOKIE}={statuspage.session_value(TOKEN)}"}
        page = await http.get("/", headers=session)
        assert page.status_code == 200
        assert "test-agent" in page.text
        status = await http.get("/v1/status", headers=session)  # what the script fetches
        assert status.status_code == 200
        assert json.loads(status.text)["agent_id"] == "test-agent"
        # The cookie never allows a mutation (another site can make a browser send it).
        sync = await http.post("/v1/sources/x/sync", json={}, headers=session)
        assert sync.status_code == 401
        out = await http.post("/logout", headers=session)
        assert out.status_code == 303
        assert statuspage.COOKIE in out.headers["set-cookie"]
        http.cookies.clear()
        stale = {"cookie": f"{statuspage.COOKIE}={statuspage.session_value('an old token')}"}
        assert (await http.get("/", headers=stale)).status_code == 401


def test_a_running_sync_shows_a_progress_bar() -> None:
    def page(entity: dict[str, Any]) -> list[dict[str, str | None]]:
        status = {"sources": {"cmms": {"type": "sql", "entities": {"wo": entity}}}}
        return [a for t, a in tags(statuspage.render(status)) if t == "progress"]

    full = {"status": "in_progress", "full": True, "known_keys": 10, "progress": {"rows": 4}}
    assert [(a.get("value"), a.get("max")) for a in page(full)] == [("4", "10")]
    # An incremental sync does not know how many rows it will read: indeterminate.
    incremental = {**full, "full": False}
    assert [(a.get("value"), a.get("max")) for a in page(incremental)] == [(None, None)]
    assert page({**full, "status": "completed"}) == []
