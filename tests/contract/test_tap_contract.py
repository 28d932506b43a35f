"""The tap contract, run against every registered source type that declares a tap.

``edge-agent tap`` (agent/tap.py) promises, whatever the source type: the items are what
the source would store (records whose keys are inputs the harness fed) and bad inputs
with their reason, never hidden; and nothing is written (the tap is handed no outbox,
and none appears). A new source type that declares ``tap`` is held to this by its
harness (tests/contract/harness.py) with no test of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.outbox import Quarantined
from agent.records import Record
from agent.sources.base import Tapped, TapRequest
from tests.contract.harness import HARNESSES, SourceHarness, Unavailable, parse
from tests.contract.registry import CONTEXT, source_types, tap_of

PARAMS = [
    pytest.param(cls, id=cls.type if len(HARNESSES[kind]) == 1 else f"{kind}-{cls.__name__}")
    for kind in source_types()
    if tap_of(kind) is not None
    for cls in HARNESSES.get(kind, [])
]


@pytest.fixture(params=PARAMS)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SourceHarness]:
    """A started peer of one source type with a tap."""
    try:
        h: SourceHarness = request.param(tmp_path)
        await h.start()
    except Unavailable as exc:
        pytest.skip(str(exc))
    try:
        yield h
    finally:
        await h.stop()


async def test_tap_shows_fed_input_and_bad_input_and_writes_nothing(
    harness: SourceHarness, tmp_path: Path
) -> None:
    tap = tap_of(harness.type)
    assert tap is not None
    config = parse(harness, harness.table("src"))
    await harness.feed(2)
    await harness.feed_bad()
    items: list[Tapped] = []

    async def run() -> None:
        async for item in tap("src", config, CONTEXT, TapRequest(limit=6, timeout=60)):
            items.append(item)

    task = asyncio.create_task(run())
    # Live input reaches only a subscriber: feed until the tap has taken its messages.
    while harness.live and not task.done():
        await harness.feed(1)
        await harness.feed_bad()
        await asyncio.sleep(0.05)
    await task
    records = [i for i in items if isinstance(i, Record)]
    keys = {k for r in records if (k := harness.key(r.envelope())) is not None}
    assert keys, items
    assert keys <= harness.expected(), (keys, harness.expected())
    bad = [i for i in items if isinstance(i, Quarantined)]
    assert any(harness.bad_reason in b.reason for b in bad), bad
    assert list(tmp_path.rglob("outbox.db*")) == []
