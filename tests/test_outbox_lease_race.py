"""Regression: concurrent ``lease()`` calls must never hand out the same record twice.

With ``upstream.concurrency > 1`` several workers lease at once. A lease that needs more
than one read round (later records of busy entities are skipped) used to yield between
choosing records and registering them, so a second lease could choose the same ones. The
same record then went out twice, and the first ack released it while the other copy was
still in flight, which unblocks later records of its entity (per-entity order at risk).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.outbox import Outbox
from agent.records import EntityType, Record, SourceRef

SRC = SourceRef("race", "test")


def _wo(remote_id: str, version: int) -> Record:
    return Record.entity(SRC, EntityType.WORK_ORDER, remote_id, {"v": version})


async def test_concurrent_leases_are_disjoint(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as box:
        # x is in flight; its later versions sit between the free records, so every
        # lease needs several read rounds and yields in between.
        records = [_wo("x", 0)]
        for i in range(40):
            records += [_wo(f"free-{i}", i)] + [_wo("x", i * 10 + k + 1) for k in range(8)]
        stored = await box.append(records)
        first = await box.lease(1, 1 << 20)
        assert first[0].id == stored.ids[0]
        leases = await asyncio.gather(*(box.lease(5, 1 << 20) for _ in range(4)))
        seqs = [item.seq for lease in leases for item in lease]
        assert len(seqs) == len(set(seqs)), "a record was leased twice"
        assert len(seqs) == 20
        assert all(item.entity_id != first[0].entity_id for lease in leases for item in lease)


async def test_lease_never_returns_acked_records_while_a_reader_is_mid_query(
    tmp_path: Path,
) -> None:
    async with Outbox(tmp_path / "o.db") as box:
        await box.append([_wo(f"e{i}", i) for i in range(30)])
        # What stats() (status, metrics, drain) does between two awaits: a query on the
        # read connection that has returned its first row. It pins that snapshot.
        # Private handle on purpose: it is the only deterministic way to interleave.
        cur = await box._rdb.execute("SELECT created_at FROM records ORDER BY seq")
        try:
            await cur.fetchone()
            first = await box.lease(10, 1 << 20)
            await box.ack([item.seq for item in first])
            second = await box.lease(10, 1 << 20)
        finally:
            await cur.close()
        assert {i.seq for i in first}.isdisjoint(i.seq for i in second), "acked record leased"
        assert [i.seq for i in second] == list(range(11, 21))


async def test_drop_oldest_never_drops_a_record_whose_lease_is_on_its_way(
    tmp_path: Path,
) -> None:
    """Regression (seen in the long-outage suite: the drop counter said 931, 930 were
    missing upstream): a full outbox in drop_oldest mode dropped the oldest reading while a
    lease of it had been chosen on the writer thread but not yet returned to the event
    loop; the forwarder then delivered a record the outbox had counted as dropped."""
    from tests.outbox_helpers import reading  # noqa: PLC0415

    first = [reading("p", n, pad=400) for n in range(10)]
    budget = sum(len(r.to_json()) for r in first) + 100
    async with Outbox(tmp_path / "o.db", max_bytes=budget, when_full="drop_oldest") as box:
        await box.append(first)
        # The lease's query runs first on the writer thread; the append's transaction is
        # queued behind it before the lease's result reaches the loop.
        lease = asyncio.create_task(box.lease(3, 1 << 20))
        append = asyncio.create_task(box.append([reading("p", n, pad=400) for n in range(10, 15)]))
        leased, _ = await asyncio.gather(lease, append)
        assert [item.seq for item in leased] == [1, 2, 3]
        dropped = (await box.stats()).counters.get("dropped:over_budget", 0)
        assert dropped >= 5
        # every leased record is still there to be acknowledged: none was dropped
        assert await box.ack([item.seq for item in leased]) == 3
