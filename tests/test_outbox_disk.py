"""The disk reserve (agent.outbox_disk) against a real small tmpfs.

Below the reserve appends wait while acks go on; space coming back (a filler deleted, or
records delivered out of an outbox that filled the disk itself) lets them through again
without anyone calling anything. A commit that hits a really full disk fails cleanly: the
connection stays usable and no lease is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.errors import OutboxWriteError
from agent.outbox import Outbox, OutboxConfig
from agent.outbox_disk import DiskState, reserve_bytes
from tests.helpers.tmpfs import fill, small_tmpfs
from tests.helpers.waiting import wait_for
from tests.outbox_helpers import reading, work_order

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "disk", "4m") as mnt:
        yield mnt


def test_reserve_sizes() -> None:
    assert reserve_bytes("auto", 4 * MiB) == MiB  # a quarter of a tiny disk
    assert reserve_bytes("auto", 1 << 30) == 16 * MiB  # the floor
    assert reserve_bytes("auto", 100 << 30) == (100 << 30) // 100  # 1 %
    assert reserve_bytes("5%", 1000 * MiB) == 50 * MiB
    assert reserve_bytes(123, 1 << 30) == 123
    config = OutboxConfig.model_validate({"disk_reserve": "64MiB"})
    assert config.disk_reserve == 64 * MiB
    assert OutboxConfig.model_validate({"disk_reserve": " 2.5% "}).disk_reserve == "2.5%"
    assert OutboxConfig.model_validate({"disk_reserve": 0}).disk_reserve == 0
    assert OutboxConfig().disk_reserve == "auto"
    for bad in ("lots", "60%", "-1", True):
        with pytest.raises(ValidationError, match="disk reserve"):
            OutboxConfig.model_validate({"disk_reserve": bad})


def test_low_counts_reusable_pages_but_keeps_half_the_reserve_free() -> None:
    assert not DiskState(MiB, 4 * MiB, 0, MiB, 0).low
    assert DiskState(MiB - 1, 4 * MiB, 0, MiB, 0).low
    assert DiskState(MiB + 100, 4 * MiB, 0, MiB, 0, 101).low  # the WAL goes into the file
    floor = MiB // 4  # the WAL's working size
    assert not DiskState(MiB // 2, 4 * MiB, MiB // 2, MiB, 0, 0, floor).low  # pages to reuse
    assert not DiskState(MiB // 8, 4 * MiB, 4 * MiB, MiB, 0, MiB // 8, floor).low  # WAL reused
    assert DiskState(MiB // 8, 4 * MiB, 4 * MiB, MiB, 0, MiB // 8 - 1, floor).low  # WAL room
    assert not DiskState(0, 4 * MiB, 0, 0, 0).low  # reserve off
    state = DiskState(64 << 10, 4 * MiB, 8192, MiB, 0)
    assert (
        state.reason()
        == "disk free 64.0 KiB below reserve 1.0 MiB (plus 8.0 KiB reusable in the outbox file)"
    )


async def disk_blocked(box: Outbox) -> bool:
    return (await box.stats()).disk_blocked_appends > 0


async def disk_low(box: Outbox) -> bool:
    disk = (await box.stats()).disk
    return disk is not None and disk.low


async def test_appends_wait_below_reserve_acks_go_on_and_resume(disk: Path) -> None:
    async with Outbox(disk / "outbox.db") as box:
        await box.append([work_order("before")])
        (leased,) = await box.lease(10, 1 << 20)
        filler = fill(disk, leave=64 << 10)
        await wait_for(lambda: disk_low(box), what="the watcher sees the disk low")
        append = asyncio.create_task(box.append([work_order("during")]))
        await wait_for(lambda: disk_blocked(box), what="the append waits for disk")
        stats = await box.stats()
        assert stats.disk is not None
        assert stats.disk.low
        assert stats.blocked_appends == 0, "the byte budget is not what holds it"
        view = stats.as_dict()["disk"]
        assert view["reason"].startswith("disk free ")
        assert view["blocked_appends"] == 1
        # the ack has room: the reserve is for exactly this
        assert await box.ack([leased.seq]) == 1
        assert not append.done()
        filler.unlink()  # space returns: the watcher lets the append through
        result = await asyncio.wait_for(append, 30)
        assert result.stored == 1
        stats = await box.stats()
        assert stats.disk is not None
        assert not stats.disk.low
        assert (stats.disk_blocked_appends, stats.write_errors) == (0, 0)


async def held_by_file(box: Outbox) -> bool:
    """An append waits, and not for a WAL the watcher will truncate: the database file
    itself holds the disk."""
    wal = Path(f"{box.path}-wal")
    return await disk_blocked(box) and (not wal.exists() or wal.stat().st_size <= box._wal_limit)


async def test_an_outbox_that_filled_the_disk_itself_resumes_once_delivered(disk: Path) -> None:
    """Deleting rows frees pages inside the file, not disk: they must count, or this
    outbox would stay blocked with nothing left to deliver."""
    async with Outbox(disk / "outbox.db", disk_reserve="1MiB") as box:
        n = 0
        while True:  # grow the file until the disk is at the reserve
            append = asyncio.create_task(
                box.append([reading("p", n + i, pad=2000) for i in range(20)])
            )
            n += 20
            await wait_for(
                lambda a=append: a.done() or held_by_file(box),  # type: ignore[misc]
                what="stored or held",
            )
            if not append.done():
                break
            assert append.result().stored == 20
        assert box._disk is not None
        assert box._disk.state.headroom < 0  # the file (and its WAL) hold the disk
        assert box._disk.state.reusable_bytes == 0
        while leased := await box.lease(200, 8 << 20):  # deliver everything stored
            assert await box.ack([x.seq for x in leased]) == len(leased)
        result = await asyncio.wait_for(append, 30)
        assert result.stored == 20
        stats = await box.stats()
        assert stats.disk is not None
        assert not stats.disk.low
        assert stats.write_errors == 0


async def test_a_commit_on_a_full_disk_fails_cleanly(disk: Path) -> None:
    """With the reserve off the disk really fills: SQLITE_FULL at commit rolls back,
    the connection stays usable, a failed ack leaves no lease behind."""
    async with Outbox(disk / "outbox.db", disk_reserve=0) as box:
        await box.append([work_order(f"wo{i}", pad=3000) for i in range(20)])
        leased = await box.lease(100, 8 << 20)
        filler = fill(disk, leave=0)
        big = [work_order(f"big{i}", pad=4000) for i in range(200)]
        with pytest.raises(OutboxWriteError, match="full"):
            await box.append(big)
        assert box._wcon is not None
        assert not box._wcon.in_transaction
        with contextlib.suppress(OutboxWriteError):  # no room even for the delete?
            await box.ack([x.seq for x in leased])  # then the records are leased again
        left = (await box.stats()).rows["business"]
        assert box._leased == {}
        assert box._lease_guard == set()
        filler.unlink()
        assert (await box.append(big)).stored == 200
        assert len(await box.lease(1000, 64 << 20)) == left + 200
        stats = await box.stats()
        assert not stats.write_failing


async def test_pages_freed_inside_the_file_let_appends_through_on_a_nearly_full_disk(
    tmp_path: Path,
) -> None:
    """Delivered records left 3.2 MB of free pages in the file, then the disk filled from
    outside to 800 KiB free: below the 2 MiB reserve, but with the free pages there is
    room, and the WAL's working size (512 KiB) is free. Appends go on. (A floor at half
    the reserve, 1 MiB of real free space, held them forever.)"""
    with small_tmpfs(tmp_path / "disk8", "8m") as disk:
        async with Outbox(disk / "outbox.db", disk_reserve="2MiB") as box:
            for n in range(0, 800, 50):  # about 3.3 MB of file (a page per record)
                batch = [reading("p", n + i, pad=2000) for i in range(50)]
                await asyncio.wait_for(box.append(batch), 30)
            while leased := await box.lease(200, 8 << 20):
                await box.ack([x.seq for x in leased])
            filler = fill(disk, leave=800 << 10)
            await wait_for(
                lambda: box._disk is not None and box._disk.state.free_bytes < MiB,
                what="the outbox saw the disk fill",
            )
            append = asyncio.create_task(
                box.append([reading("q", i, pad=2000) for i in range(50)])
            )
            result = await asyncio.wait_for(append, 30)
            assert result.stored == 50
            stats = await box.stats()
            assert stats.disk is not None
            assert stats.disk.reusable_bytes > 2 * MiB
            assert stats.disk.free_bytes < MiB
            filler.unlink()
