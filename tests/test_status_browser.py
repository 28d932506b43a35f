"""The status page in a real browser: headless Chromium (Debian's ``chromium``; .ci/run
installs it) loads ``/`` from a running agent with an MQTT, a Modbus and an SQL source and
an upstream outage, runs its script (which refreshes from /v1/status), and shows every
component with the numbers /v1/status gives; a screenshot is saved in the test's tmp dir.

Chromium is driven by its command line (``--dump-dom``, ``--screenshot``) with a virtual
time budget, so the page's script has run its first refresh before the DOM is dumped.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from agent import statuspage
from tests.agent_harness import running_agent, settings_for
from tests.agent_process import ModbusServerThread
from tests.helpers.mosquitto import Mosquitto
from tests.helpers.mqttpub import Publisher
from tests.helpers.waiting import free_port
from tests.test_metrics import sources

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed (apt-get install -y chromium; .ci/run does it)",
)

# Counters that only grow while the upstream is down: what the page shows lies between
# what /v1/status said before and after the browser looked.
GROWING = {
    "records", "quarantined", "restarts", "polls", "failures", "received", "sent",
    "accepted", "rejected", "total_rows", "dead_letters", "retries", "messages",
}  # fmt: skip
# Values that move on their own (times, rates, the id of each retried request).
MOVING = {"last_request_id", "last_error", "uptime_seconds", "horizon", "held_messages"}


def chromium_flags(profile: Path) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=4000",
    ]


async def chromium(profile: Path, *args: str) -> str:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *chromium_flags(profile),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


class Values(HTMLParser):
    """Every live value (``data-k``/``data-f``, ``data-s``) with its text, the sections
    of the sources, the device and entity rows, and the body's attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[tuple[list[str], str, str]] = []
        self.names: set[str] = set()
        self.sources: set[str] = set()
        self.body: dict[str, str | None] = {}
        self._open: list[tuple[list[str], str] | None] = []
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if a.get("data-source"):
            self.sources.add(str(a["data-source"]))
        if a.get("data-name"):
            self.names.add(str(a["data-name"]))
        if tag == "span":
            key = a.get("data-k") or a.get("data-s")
            fmt = a.get("data-f") or "state"
            self._open.append((json.loads(key), fmt) if key else None)
            self._text = []

    def handle_data(self, data: str) -> None:
        self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self._open:
            top = self._open.pop()
            if top is not None:
                self.values.append((top[0], top[1], "".join(self._text)))


def number(text: str) -> float:
    """``1,234`` or ``12.8 KiB`` as a number (bytes for the latter)."""
    value, _, unit = text.replace(",", "").partition(" ")
    return float(value) * {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]


def growing(path: list[str]) -> bool:
    return (
        path[-1] in GROWING
        or path[-1] == "total_bytes"
        or path[:2]
        in (
            ["outbox", "rows"],
            ["outbox", "bytes"],
        )
    )


def check_value(path: list[str], fmt: str, shown: str, before: Any, after: Any) -> None:
    where = f"{'.'.join(path)} ({fmt}) shows {shown!r}"
    assert shown != "", where
    b, a = statuspage.get(before, path), statuspage.get(after, path)
    if MOVING & set(path) or fmt in {"ago", "in", "dur"}:
        return
    if fmt in {"int", "bytes"} and growing(path) and b is not None and a is not None:
        slack = 0.05 * number(shown) if fmt == "bytes" else 0  # one decimal of KiB/MiB
        assert b - slack <= number(shown) <= a + slack, f"{where}; status {b} .. {a}"
        return
    allowed = {statuspage.fmt(b, fmt), statuspage.fmt(a, fmt)}
    if fmt == "state":
        allowed = {str(b or "-"), str(a or "-")}
    assert shown in allowed, f"{where}; /v1/status: {allowed}"


@pytest.mark.slow
async def test_the_page_in_chromium_shows_every_component_as_status_does(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        with ModbusServerThread() as modbus:
            settings = settings_for(
                tmp_path,
                # The outage: nothing listens there. Slow retries keep the request id still.
                upstream={
                    "url": f"http://127.0.0.1:{free_port()}",
                    "backoff_initial": "30s",
                    "backoff_cap": "60s",
                },
                sources=sources(tmp_path, broker.port, modbus.port),
                api={"horizon_min_sample": "1s"},
            )
            async with running_agent(settings) as agent:
                await produced(agent, broker.port)
                url = f"http://{settings.api.listen}/"
                before = await agent.status()
                dom = await chromium(tmp_path / "profile-dom", "--dump-dom", url)
                after = await agent.status()
                shot = tmp_path / "status-page.png"
                phone = tmp_path / "status-page-phone.png"
                await chromium(
                    tmp_path / "profile-shot",
                    f"--screenshot={shot}",
                    "--window-size=1280,1900",
                    url,
                )
                await chromium(
                    tmp_path / "profile-phone",
                    f"--screenshot={phone}",
                    "--window-size=412,2400",
                    url,
                )
    finally:
        broker.stop()
    page = Values()
    page.feed(dom)
    # The script ran and refreshed from /v1/status (it marks the body when it did).
    assert page.body.get("data-refreshed"), "the page's script did not refresh"
    assert page.body.get("data-stale") is None
    assert page.sources == set(after["sources"]) == {"feed", "meters", "cmms"}
    devices = set(after["sources"]["meters"]["devices"])
    entities = set(after["sources"]["cmms"]["entities"])
    subscriptions = set(after["sources"]["feed"]["subscriptions"])
    assert subscriptions == {"site/{asset}/load"}
    assert devices | entities | subscriptions <= page.names
    shown = {tuple(p) for p, _, _ in page.values}
    for name, st in after["sources"].items():
        assert ("sources", name, "state") in shown
        assert ("sources", name, "records") in shown
        for dev in st.get("devices") or {}:
            assert ("sources", name, "devices", dev, "state") in shown
            assert ("sources", name, "devices", dev, "polls") in shown
        for ent in st.get("entities") or {}:
            assert ("sources", name, "entities", ent, "last_successful_sync_at") in shown
    for key in ("total_rows", "dead_letters", "oldest_age_seconds"):
        assert ("outbox", key) in shown
    for topic in subscriptions:
        assert ("sources", "feed", "subscriptions", topic, "messages") in shown
        assert ("sources", "feed", "subscriptions", topic, "quarantined") in shown
    assert ("upstream", "health", "state") in shown
    assert ("upstream", "last_request_id") in shown
    assert ("outbox", "horizon", "text") in shown
    for path, fmt, text in page.values:
        check_value(path, fmt, text, before, after)
    states = {tuple(p): t for p, _, t in page.values}
    assert states[("upstream", "health", "state")] == "retrying"  # the outage, shown
    assert states[("sources", "meters", "devices", "gone", "state")] == "retrying"
    assert "about " in states[("outbox", "horizon", "text")]
    assert "NOT READY" in dom
    for png in (shot, phone):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 20_000, png  # a rendered page, not a blank one


async def produced(agent: Any, broker: int) -> None:
    """Until every source produced a record, the silent Modbus unit is demoted, an SQL
    sync completed and the upstream retries (bounded, not a timing assert)."""

    def ready(st: dict[str, Any]) -> bool:
        src = st["sources"]
        gone = src["meters"].get("devices", {}).get("gone", {})
        wo = src["cmms"].get("entities", {}).get("work_orders", {})
        return (
            all(src[n]["records"] > 0 for n in ("feed", "meters", "cmms"))
            and gone.get("state") == "retrying"
            and wo.get("status") == "completed"
            and st["upstream"]["health"]["state"] == "retrying"
            and st["outbox"]["horizon"]["state"] == "known"
        )

    async with asyncio.timeout(90):
        i = 0
        while not ready(await agent.status()):
            with Publisher(broker) as pub:
                pub.publish(f"site/L{i % 5}/load", f'{{"kg": {100 + i}}}')
            i += 1
            await asyncio.sleep(0.3)
