"""Property test: chained entity version ids over random histories, against a model.

Hypothesis draws random version sequences for a few entities, from a small alphabet so
that returns to an earlier content (A, B, A) are common, and appends them in random
groupings (concurrent appends share one transaction). In between it delivers leased
records to the reference receiver's store (sometimes losing the answer, so they are sent
again), restarts the outbox cleanly or after a simulated power cut, lets a commit fail
(disk full), and replaces the outbox by a fresh one (a corrupt file moved aside).

The model knows the epoch of each outbox file and computes every id by DESIGN.md's rule
itself. It checks that

* every stored version has the chained id (``uuid5(entity_id:content_hash:prev)``), and a
  version equal to the entity's last one is not stored;
* no id is ever assigned twice, across restarts and outbox files (ids distinct per
  transition);
* a redelivery carries the same id and bytes, and the receiver calls it a duplicate;
* once everything is delivered, the receiver's latest version of every entity is the
  last version appended (or, for records lost with a replaced outbox, the last one
  delivered).
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from agent.errors import OutboxWriteError
from agent.outbox import Leased, Outbox
from agent.receiver import Store
from agent.records import EntityType, Record, chain_id
from tests.outbox_helpers import SRC

KEYS = ["E0", "E1", "E2"]
STATES = "ABC"
PAD = "x" * 60_000  # a version this big needs new pages: a full disk refuses it

Version = tuple[str, str]  # (entity key, content)
appends = st.lists(
    st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(STATES)), max_size=5),
    min_size=1,
    max_size=4,
)


def version(key: str, state: str, pad: bool = False) -> Record:
    """The work order ``key`` with content ``state`` (``pad``: a large one)."""
    data = {"state": state, **({"notes": PAD} if pad else {})}
    return Record.entity(SRC, EntityType.WORK_ORDER, key, data)


@dataclass
class Model:
    """What the outbox and the receiver must show."""

    epoch: str
    last: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (state, id)
    assigned: dict[str, Version] = field(default_factory=dict)  # every id ever -> version
    delivered: dict[str, str] = field(default_factory=dict)  # key -> latest state received
    truth: dict[str, str] = field(default_factory=dict)  # key -> state the receiver must end at

    def expect(self, records: list[Record]) -> list[str | None]:
        """The ids ``records`` must get, appended in this order (and take them)."""
        out: list[str | None] = []
        for rec in records:
            key, state = rec.remote_id, rec.data["state"]
            last = self.last.get(key)
            if last is not None and last[0] == state:
                out.append(None)
                continue
            rid = chain_id(rec.entity_id, rec.content_hash, self.epoch if last is None else last[1])
            assert rid not in self.assigned, f"id {rid} assigned twice"
            self.assigned[rid] = (key, state)
            self.last[key] = (state, rid)
            self.truth[key] = state
            out.append(rid)
        return out


class ChainMachine(RuleBasedStateMachine):
    """Random histories of entity versions through outbox files and a receiver."""

    @initialize()
    def start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-chain-"))
        self.loop = asyncio.new_event_loop()
        self.files = 0
        self.store = Store(self.dir / "rx.db")
        self.box = self._open(self._new_path())
        self.model = Model(self.box.epoch)
        self.epochs = {self.box.epoch}
        self.bodies: dict[str, bytes] = {}  # id -> body as first delivered (without seq)

    def _new_path(self) -> Path:
        self.files += 1
        return self.dir / f"o{self.files}.db"

    def _open(self, path: Path) -> Outbox:
        box = Outbox(path)
        self.run(box.open())
        return box

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        if hasattr(self, "box"):
            try:
                self.drain()  # every history ends checked at the receiver
            finally:
                self._close()

    def _close(self) -> None:
        if hasattr(self, "box"):
            self.run(self.box.close())
            self.store.close()
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    async def _append_all(self, groups: list[list[Record]]) -> list[object]:
        # Started in order, so queued (and committed) in order; the writer takes whatever
        # is queued as one group, so the groupings vary with timing, the order never.
        return await asyncio.gather(*(self.box.append(g) for g in groups), return_exceptions=True)

    @rule(groups=appends)
    def append(self, groups: list[list[Version]]) -> None:
        records = [[version(k, s) for k, s in g] for g in groups]
        for group, result in zip(records, self.run(self._append_all(records)), strict=True):
            assert not isinstance(result, BaseException), result
            assert result.ids == self.model.expect(group)  # type: ignore[attr-defined]

    @rule(groups=appends, pad_state=st.sampled_from(STATES))
    def append_while_disk_full(self, groups: list[list[Version]], pad_state: str) -> None:
        """Commits that may fail: when one does, nothing of it happened."""
        pad = version("PAD", pad_state, pad=True)
        records = [[version(k, s) for k, s in g] + [pad] for g in groups]
        self._on_writer("PRAGMA max_page_count=1")  # the file cannot grow
        try:
            results = self.run(self._append_all(records))
        finally:
            self._on_writer("PRAGMA max_page_count=1073741823")
        for group, result in zip(records, results, strict=True):
            if isinstance(result, OutboxWriteError):
                event("a commit failed")
                continue  # not stored: the model does not move
            assert not isinstance(result, BaseException), result
            assert result.ids == self.model.expect(group)  # type: ignore[attr-defined]

    def _on_writer(self, sql: str) -> None:
        con = self.box._wcon
        assert con is not None
        self.run(self.loop.run_in_executor(self.box._executor, con.execute, sql))

    @rule(n=st.integers(1, 8), lose_answer=st.booleans())
    def deliver(self, n: int, lose_answer: bool) -> None:
        leased = self.run(self.box.lease(n, 1 << 30))
        if not leased:
            return
        self._ingest(leased)
        if lose_answer:
            self.box.release(x.seq for x in leased)  # sent again later, same ids
        else:
            self.run(self.box.ack([x.seq for x in leased]))

    def _ingest(self, leased: list[Leased]) -> None:
        envelopes = [orjson.loads(x.body) for x in leased]
        accepted, duplicates = self.store.ingest("agent", "batch", envelopes)
        for x, env in zip(leased, envelopes, strict=True):
            assert env["id"] == x.id
            key, state = self.model.assigned[x.id]  # only ids the model made are ever sent
            assert (env["remote_id"], env["data"]["state"]) == (key, state)
            body = x.body[: x.body.rindex(b',"seq":')]
            if x.id in self.bodies:
                event("a redelivery")
                assert x.id in duplicates, "a redelivery is a duplicate"
                assert body == self.bodies[x.id], "a redelivery carries the same bytes"
            else:
                assert x.id in accepted
                self.bodies[x.id] = body
                self.model.delivered[key] = state

    @rule()
    def restart(self) -> None:
        self.run(self.box.close())
        self.box = self._open(self.box.path)
        assert self.box.epoch == self.model.epoch

    @rule()
    def power_cut(self) -> None:
        """The files as a power cut leaves them: what committed, no leases."""
        path = self._new_path()
        shutil.copy(self.box.path, path)
        wal = Path(f"{self.box.path}-wal")
        if wal.exists():
            shutil.copy(wal, f"{path}-wal")
        self.run(self.box.close())
        self.box = self._open(path)
        assert self.box.epoch == self.model.epoch

    @rule()
    def outbox_replaced(self) -> None:
        """The outbox is lost (a corrupt file moved aside): what it held is gone, the
        fresh one chains from a new epoch."""
        self.run(self.box.close())
        self.box = self._open(self._new_path())
        assert self.box.epoch not in self.epochs
        self.epochs.add(self.box.epoch)
        self.model.epoch = self.box.epoch
        self.model.last.clear()
        self.model.truth = dict(self.model.delivered)

    @rule()
    def drain(self) -> None:
        """Deliver everything; then the receiver's latest must be the truth."""
        while leased := self.run(self.box.lease(50, 1 << 30)):
            self._ingest(leased)
            self.run(self.box.ack([x.seq for x in leased]))
        event(f"drained with {len(self.model.truth)} entities")
        latest = self.store.latest(SRC.name, "work_order")
        assert {k: env["data"]["state"] for k, env in latest.items()} == self.model.truth

    @invariant()
    def stored_ids_are_the_models(self) -> None:
        if not hasattr(self, "box"):
            return
        con = sqlite3.connect(self.box.path)
        try:
            rows = con.execute("SELECT id, body FROM records").fetchall()
        finally:
            con.close()
        for rid, body in rows:
            assert rid in self.model.assigned
            assert orjson.loads(body)["id"] == rid


ChainMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestChainModel = ChainMachine.TestCase
