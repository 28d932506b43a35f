"""The SAP change fuzzer (tests/sql/fuzz.py) through the real source, outbox, forwarder and
reference receiver, on PostgreSQL and MariaDB.

Each round applies random mutation kinds (sometimes while a sync runs, sometimes with the
agent killed mid-sync or mid-reconciliation and restarted), then

1. one incremental pass: the receiver's latest version of every entity that only
   feed-seen kinds touched (and of every untouched one) equals the truth, field by field;
2. one reconciliation pass: every entity equals the truth, nothing deleted is live, and
   every drift it reports is on an entity a reconciliation-only kind touched.

CI runs a short variant (well under 60 s for both databases). The long one:
``EDGE_AGENT_FUZZ_STEPS=3000 pytest tests/sql/test_sql_fuzz.py -k long`` (optionally
``EDGE_AGENT_FUZZ_SEED``); it prints its figures. ``FUZZ_DEBUG=1`` prints the mutation log.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.forwarder import Forwarder
from agent.outbox import Outbox
from agent.receiver import Receiver, running_receiver
from agent.sources.sql import SqlSource
from tests.helpers.outputs import PowerCut, TestOutput
from tests.helpers.waiting import wait_for
from tests.sql import fuzz
from tests.sql.conftest import Backend, make_source, sql_config
from tests.sql.sapdb import SapDb
from tests.upstream_support import TOKEN, make_settings

SIZES = {"locations": 6, "assets": 12, "parts": 6, "work_orders": 40, "notifications": 8,
         "readings": 8, "purchase_orders": 4}  # fmt: skip
ENTITIES = list(fuzz.ENTITY_TYPES)


@dataclass
class Figures:
    """What a run did (printed by the long variant)."""

    rounds: int = 0
    steps: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    meta: Counter[str] = field(default_factory=Counter)
    drifts: int = 0
    reconcile_only: int = 0
    entities: int = 0
    seconds: float = 0.0


class Run:
    """One fuzzer run: the world, the agent pieces, the checks."""

    def __init__(self, backend: Backend, tmp: Path, seed: int, *, chunk: int) -> None:
        self.backend, self.tmp, self.seed = backend, tmp, seed
        self.rng = random.Random(seed)
        self.sap = SapDb(backend.engine, backend.schema, extra={fuzz.Z_FIELD[0]: (fuzz.Z_FIELD[1],)})
        self.world = fuzz.World(self.sap, self.rng, mass=chunk + 3)
        self.config = sql_config(
            backend,
            timezone="Europe/Berlin",
            chunk_size=chunk,
            change_documents=True,
            mappings={"work_orders": {"custom": {"zz_contract": fuzz.Z_FIELD[1]}}},
        )
        self.figures = Figures()
        self.log: list[str] = []
        self.deck: list[fuzz.Kind] = []

    def source(self) -> SqlSource:
        return make_source(self.config)

    async def drained(self, box: Outbox) -> None:
        async def empty() -> bool:
            stats = await box.stats()
            return sum(stats.rows.values()) == 0

        await wait_for(empty, what="the outbox delivered to the receiver")
        assert (await box.stats()).dead_letters == 0

    def check(self, rx: Receiver, truth: dict[str, Any], skip: set[tuple[str, str]], when: str) -> None:
        wrong: list[str] = []
        for entity in ENTITIES:
            upstream = rx.store.latest("sap-prd", fuzz.ENTITY_TYPES[entity])
            keys = {k for e, k in skip if e == entity}
            wrong += fuzz.differences(entity, truth[entity], upstream, keys)
        assert not wrong, (
            f"seed {self.seed}, after {when}: {len(wrong)} wrong\n" + "\n".join(wrong[:30])
            + "\nmutations:\n" + "\n".join(self.log[-60:])
        )

    async def mutate(self, n: int, feeds: dict[str, set[str]]) -> set[tuple[str, str]]:
        """Apply ``n`` random kinds; returns what reconciliation-only kinds touched."""
        only_reconcile: set[tuple[str, str]] = set()
        for _ in range(n):
            if not self.deck:  # every kind once, in random order, then again
                self.deck = self.rng.sample(fuzz.KINDS, len(fuzz.KINDS))
            k = self.deck.pop()
            seen = k.seen_by is not None and k.seen_by in feeds[k.entity]
            keys = await k.run(self.world)
            if seen:
                self.world.fed.update((k.entity, key) for key in keys)
            self.log.append(f"{k.name} {keys} ({'feed ' + str(k.seen_by) if seen else 'reconcile'})")
            self.figures.kinds[k.name] += 1
            self.figures.steps += 1
            if not seen:
                only_reconcile.update((k.entity, key) for key in keys)
            await asyncio.sleep(0)  # lets a sync running beside the changes interleave
        return only_reconcile

    async def round(self, source: SqlSource, box: Outbox, rx: Receiver, per_round: int) -> SqlSource:
        feeds = {s.name: {f.name for f in s.feeds} for s in source.specs}
        meta = self.rng.choice(["plain", "plain", "during_sync", "kill_sync", "kill_reconcile"])
        self.figures.meta[meta] += 1
        self.log.append(f"-- round {self.figures.rounds} ({meta})")
        if meta == "during_sync":
            running = asyncio.create_task(source.sync_once(box))
            touched = await self.mutate(per_round, feeds)
            await running
        else:
            touched = await self.mutate(per_round, feeds)
        if meta == "kill_sync":
            source = await self.killed(source, box, lambda s, out: s.sync_once(out))
        await source.sync_once(box)  # THE incremental pass after the changes
        await self.drained(box)
        self.check(rx, await fuzz.truth(self.world), touched, "the incremental pass")
        with capture_logs() as logs:
            if meta == "kill_reconcile":
                source = await self.killed(source, box, reconcile_all)
            await reconcile_all(source, box)  # THE reconciliation pass (or its rest)
        await self.drained(box)
        self.check(rx, await fuzz.truth(self.world), set(), "the reconciliation pass")
        drifted = {(e["entity"], e["key"]) for e in logs if e["event"] == "sql_reconcile_drift"}
        assert drifted <= touched, (
            f"seed {self.seed}: drifts on entities only feed-seen kinds touched (a feed "
            f"missed what its tag says it sees): {sorted(drifted - touched)}\n"
            + "\n".join(self.log[-40:])
        )
        self.figures.drifts += len(drifted)
        self.figures.reconcile_only += len(touched)
        self.figures.rounds += 1
        return source

    async def killed(self, source: SqlSource, box: Outbox, work: Any) -> SqlSource:
        """Run ``work`` until the process 'dies' at a random append, then a new process."""
        at, after_commit = self.rng.randrange(1, 8), self.rng.random() < 0.5
        out = TestOutput(box)
        out.fail(PowerCut(), at=at, after_commit=after_commit)
        try:
            await work(source, out)
        except PowerCut:
            self.log.append(f"   killed at append {at} (after commit: {after_commit})")
        await source.aclose()
        source = self.source()
        await source.prepare(box)
        return source


async def reconcile_all(source: SqlSource, out: Any) -> None:
    await source.prepare(out)
    for name in ENTITIES:
        await source.entities[name].reconcile(out)


async def fuzz_run(backend: Backend, tmp: Path, seed: int, rounds: int, per_round: int) -> Figures:
    run = Run(backend, tmp, seed, chunk=7)
    began = time.monotonic()
    await run.sap.create()
    await run.world.populate(SIZES)
    async with Outbox(tmp / "outbox.db") as box, running_receiver(tmp / "rx.db", TOKEN) as rx:
        forwarder = Forwarder(box, make_settings(tmp, rx.url).upstream, "fuzz")
        await forwarder.start()
        source = run.source()
        try:
            await source.sync_once(box, reconcile=True)  # initial sync, first pass
            await run.drained(box)
            run.check(rx, await fuzz.truth(run.world), set(), "the initial sync")
            for _ in range(rounds):
                source = await run.round(source, box, rx, per_round)
            run.figures.entities = sum(len(v) for v in (await fuzz.truth(run.world)).values())
        finally:
            await source.aclose()
            await forwarder.stop()
    run.figures.seconds = time.monotonic() - began
    if os.environ.get("FUZZ_DEBUG"):
        print("\n".join(run.log))
    return run.figures


def test_the_kinds_cover_every_change_class():
    names = {k.name for k in fuzz.KINDS}
    assert len(names) == len(fuzz.KINDS) >= 25
    feeds = {k.seen_by for k in fuzz.KINDS}
    assert {None, "changes", "status", "change_documents", "lines", "snapshot"} <= feeds
    assert {k.entity for k in fuzz.KINDS} == set(fuzz.ENTITY_TYPES)


@pytest.mark.parametrize("seed", [2026])
async def test_sap_change_fuzzer(backend: Backend, tmp_path: Path, seed: int):
    figures = await fuzz_run(backend, tmp_path, seed, rounds=6, per_round=8)
    assert figures.rounds == 6
    assert set(figures.kinds) == {k.name for k in fuzz.KINDS}, "every kind ran"
    assert figures.drifts > 0


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("EDGE_AGENT_FUZZ_STEPS"), reason="long run: set EDGE_AGENT_FUZZ_STEPS")
async def test_sap_change_fuzzer_long(backend: Backend, tmp_path: Path):
    steps = int(os.environ["EDGE_AGENT_FUZZ_STEPS"])
    seed = int(os.environ.get("EDGE_AGENT_FUZZ_SEED", "1"))
    per_round = 12
    figures = await fuzz_run(backend, tmp_path, seed, rounds=max(1, steps // per_round), per_round=per_round)
    print(
        f"\nfuzz {backend.name} seed {seed}: {figures.steps} mutations in {figures.rounds} "
        f"rounds, {figures.seconds:.0f} s; {len(figures.kinds)} kinds {dict(figures.kinds)}; "
        f"meta {dict(figures.meta)}; reconcile-only touches {figures.reconcile_only}, "
        f"drifts sent {figures.drifts}; {figures.entities} entities at the end"
    )
