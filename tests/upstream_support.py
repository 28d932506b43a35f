"""Upstream test support: a real receiver on 127.0.0.1, an outbox, record factories.

Test modules import the fixtures they use (``receiver_fixture``, ``outbox_fixture``), so
this stays independent of any shared conftest.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent import config as cfg
from agent.outbox import Outbox
from agent.receiver import Receiver, running_receiver
from agent.records import EntityType, Record, SourceRef

TOKEN = "s3cret-token"
SOURCE = SourceRef("plant", "test", "site-1")


def make_records(n: int, entities: int = 10, start: int = 0) -> list[Record]:
    """``n`` work-order versions spread over ``entities`` entities (unique ids)."""
    return [
        Record.entity(SOURCE, EntityType.WORK_ORDER, f"wo-{i % entities}", {"version": i})
        for i in range(start, start + n)
    ]


def make_settings(tmp_path: Path, url: str, **upstream: Any) -> cfg.Settings:
    """Settings with fast retries (tests wait for conditions, never for fixed times)."""
    section: dict[str, Any] = {
        "url": url,
        "token": TOKEN,
        "backoff_initial": 0.01,
        "backoff_cap": 0.1,
        "reauth_probe_interval": "10m",
        "connect_timeout": 2.0,
        "read_timeout": 10.0,
    }
    section.update(upstream)
    data = {"agent": {"id": "agent-test", "state_dir": str(tmp_path)}, "upstream": section}
    return cfg.parse(data)[0]


@pytest.fixture(name="receiver")
async def receiver_fixture(tmp_path: Path) -> AsyncIterator[Receiver]:
    async with running_receiver(tmp_path / "receiver.db", TOKEN, admin_token="admin") as rx:
        yield rx


@pytest.fixture(name="outbox")
async def outbox_fixture(tmp_path: Path) -> AsyncIterator[Outbox]:
    async with Outbox(tmp_path / "outbox.db") as box:
        yield box
