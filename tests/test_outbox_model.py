"""Model-based test: the outbox against a plain in-memory model, with close/reopen.

Hypothesis drives random sequences of append (with cursors), lease, ack, reject, release,
requeue and reopen. After every step the outbox must hold exactly what the model holds,
leases must follow the model's ordering rule, and cursors must match.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from agent.outbox import Cursor, Leased, Outbox
from tests.outbox_helpers import reading, work_order

ENTITIES = [f"E{i}" for i in range(5)]


@dataclass
class Row:
    seq: int
    id: str
    entity_id: str


@dataclass
class Model:
    rows: dict[int, Row] = field(default_factory=dict)  # seq -> row, what is stored
    dead: dict[int, Row] = field(default_factory=dict)
    leased: set[int] = field(default_factory=set)
    cursors: dict[str, int] = field(default_factory=dict)
    appended: list[tuple[str, str]] = field(default_factory=list)  # (id, entity_id) pending seq

    def eligible(self) -> list[Row]:
        busy = {self.rows[s].entity_id for s in self.leased}
        out = []
        for seq in sorted(self.rows):
            row = self.rows[seq]
            if seq in self.leased or row.entity_id in busy:
                busy.add(row.entity_id)
                continue
            out.append(row)
        return out


class OutboxMachine(RuleBasedStateMachine):
    """Random operations; the model says what must be true."""

    @initialize()
    def start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-model-"))
        self.loop = asyncio.new_event_loop()
        self.box = self._open()
        self.model = Model()
        self.version = 0
        self.leases: dict[int, Leased] = {}

    def _open(self) -> Outbox:
        box = Outbox(self.dir / "o.db")
        self.loop.run_until_complete(box.open())
        return box

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        if hasattr(self, "box"):
            self.run(self.box.close())
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    @rule(
        keys=st.lists(st.sampled_from(ENTITIES), min_size=0, max_size=4),
        readings=st.integers(0, 3),
        cursor=st.one_of(st.none(), st.integers(0, 1000)),
    )
    def append(self, keys: list[str], readings: int, cursor: int | None) -> None:
        recs = []
        for key in keys:
            self.version += 1
            recs.append(work_order(key, self.version))
        for _ in range(readings):
            self.version += 1
            recs.append(reading("meter", self.version))
        cur = Cursor("src", "wm", cursor) if cursor is not None else None
        result = self.run(self.box.append(recs, cur))
        if cursor is not None:
            self.model.cursors["wm"] = cursor
        # learn the seqs the outbox assigned: the newest len(recs) rows, in order
        if recs:
            got = self.run(self._tail(len(recs)))
            assert [g[1] for g in got] == result.ids
            assert all(g[0] > max(self.model.rows, default=0) for g in got)
            for (seq, rid), r in zip(got, recs, strict=True):
                self.model.rows[seq] = Row(seq, rid, r.entity_id)

    async def _tail(self, n: int) -> list[tuple[int, str]]:
        async with self.box._rdb.execute(
            "SELECT seq, id FROM records ORDER BY seq DESC LIMIT ?", (n,)
        ) as cur:
            rows = await cur.fetchall()
        return [(s, i) for s, i in reversed(rows)]

    @rule(n=st.integers(1, 6))
    def lease(self, n: int) -> None:
        expected = self.model.eligible()[:n]
        got = self.run(self.box.lease(n, 10**9))
        assert [x.seq for x in got] == [r.seq for r in expected]
        for x in got:
            assert orjson.loads(x.body)["seq"] == x.seq
            self.leases[x.seq] = x
            self.model.leased.add(x.seq)

    @precondition(lambda self: self.model.leased)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.model.leased)), unique=True))
        assert self.run(self.box.ack(seqs)) == len(seqs)
        for s in seqs:
            del self.model.rows[s]
            self.model.leased.discard(s)

    @precondition(lambda self: self.model.leased)
    @rule(data=st.data())
    def reject(self, data: st.DataObject) -> None:
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.model.leased)), unique=True))
        assert self.run(self.box.reject([(s, f"bad {s}") for s in seqs])) == len(seqs)
        for s in seqs:
            self.model.dead[s] = self.model.rows.pop(s)
            self.model.leased.discard(s)

    @precondition(lambda self: self.model.leased)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.model.leased)), unique=True))
        self.box.release(seqs)
        self.model.leased -= set(seqs)

    @rule()
    def requeue_all(self) -> None:
        assert self.run(self.box.requeue_dead()) == len(self.model.dead)
        self.model.rows.update(self.model.dead)
        self.model.dead.clear()

    @rule()
    def reopen(self) -> None:
        self.run(self.box.close())
        self.box = self._open()
        self.model.leased.clear()  # leases live in memory: a restart re-leases everything

    @invariant()
    def stored_matches_model(self) -> None:
        if not hasattr(self, "box"):
            return

        async def snapshot() -> tuple[list[tuple[int, str]], list[tuple[int, str]], object]:
            async with self.box._rdb.execute("SELECT seq, id FROM records ORDER BY seq") as c:
                rows = [tuple(r) for r in await c.fetchall()]
            async with self.box._rdb.execute("SELECT seq, reason FROM dead_letters") as c:
                dead = [tuple(r) for r in await c.fetchall()]
            return rows, dead, await self.box.cursor("src", "wm")  # type: ignore[return-value]

        rows, dead, cursor = self.run(snapshot())
        assert rows == [(s, r.id) for s, r in sorted(self.model.rows.items())]
        assert sorted(dead) == sorted((s, f"bad {s}") for s in self.model.dead)
        assert cursor == self.model.cursors.get("wm")
        stats = self.run(self.box.stats())
        assert sum(stats.rows.values()) == len(self.model.rows)
        assert stats.dead_letters == len(self.model.dead)


OutboxMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestOutboxModel = OutboxMachine.TestCase
