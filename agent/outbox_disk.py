"""Free disk space under the outbox: appends wait while it is below a reserve.

SQLite needs disk space for more than new records. Deleting delivered records (acks),
dead-lettering, cursor updates and checkpoints all write WAL frames, and a checkpoint
copies the WAL into the database file, which may grow. When appends may take the last
free byte, those writes fail as well: nothing is acked, the WAL cannot be checkpointed
into the full file, the space never comes back, and the agent is wedged even after
whatever else filled the disk is gone (the outbox's own WAL now holds that space). So the
outbox keeps a reserve: while free space on its filesystem is below it, :meth:`append`
waits (backpressure, sources stop reading), and everything that frees space or moves the
outbox forward (acks, dead letters, checkpoints) still has room.

What counts as free: the filesystem's free bytes (``statvfs``, the space an unprivileged
process may use) plus the pages inside the outbox file that delivered records left free
(``PRAGMA freelist_count``: new records reuse them without growing the file). Without
them, an outbox that filled the disk itself would stay blocked after delivering
everything: deleting rows frees pages, not disk. New records pass through the WAL first,
so besides, the free bytes plus the WAL file (reused after each checkpoint) must hold the
WAL's working size (a quarter of the reserve, see the outbox). That floor must stay well
below the reserve: a floor at half of it wedged an outbox whose file had grown close to
it, with every page it needed free inside the file.

The reserve (``outbox.disk_reserve``):

* ``"auto"`` (default): 1 % of the filesystem, at least 16 MiB, but never more than a
  quarter of the filesystem (so a tiny disk, a 4 MiB tmpfs in the tests, gets 1 MiB);
* a size (``"64MiB"``), or a percentage of the filesystem (``"5%"``);
* ``0`` turns the reserve off (appends then fail with ``database or disk is full``
  when the disk is full, and are retried).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

from agent.configtypes import parse_size

AUTO_MIN = 16 << 20
"""The automatic reserve is at least this ..."""
AUTO_SHARE = 0.01
"""... or this share of the filesystem, whichever is larger ..."""
AUTO_MAX_SHARE = 0.25
"""... but at most this share of it (small disks)."""

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_reserve(value: Any) -> str | int:
    """``"auto"``, a percentage (``"5%"``, kept as text) or a size in bytes."""
    if isinstance(value, str):
        text = value.strip()
        if text == "auto":
            return text
        if m := _PERCENT.match(text):
            if float(m.group(1)) > 50:
                raise PydanticCustomError(
                    "disk_reserve",
                    "disk reserve {value} is more than half the disk",
                    {"value": repr(value)},
                )
            return text
    try:
        return parse_size(value)
    except PydanticCustomError:
        raise PydanticCustomError(
            "disk_reserve",
            "invalid disk reserve {value} (write 'auto', a size such as '64MiB', "
            "or a share of the disk such as '5%')",
            {"value": repr(value)},
        ) from None


DiskReserve = Annotated[str | int, BeforeValidator(parse_reserve)]
"""The type of ``outbox.disk_reserve``."""


def reserve_bytes(setting: str | int, total: int) -> int:
    """The reserve in bytes for ``setting`` on a filesystem of ``total`` bytes."""
    if isinstance(setting, int):
        return setting
    if setting == "auto":
        return int(min(max(AUTO_MIN, total * AUTO_SHARE), total * AUTO_MAX_SHARE))
    m = _PERCENT.match(setting)
    if m is None:  # parse_reserve lets nothing else through
        raise ValueError(f"invalid disk reserve {setting!r}")
    return int(total * float(m.group(1)) / 100)


def format_bytes(n: int) -> str:
    """``1.5 MiB``-style text for messages."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True, slots=True)
class DiskState:
    """One look at the outbox's filesystem."""

    free_bytes: int
    """Free on the filesystem (for an unprivileged process)."""
    total_bytes: int
    reusable_bytes: int
    """Free pages inside the outbox file (new records reuse them), as last read."""
    reserve_bytes: int
    since: float
    """Since when the disk is low (or fine), Unix time."""
    wal_bytes: int = 0
    """The size of the outbox's WAL file (reused after a checkpoint)."""
    floor_bytes: int = 0
    """Free plus WAL bytes needed whatever the reusable pages (the WAL's working size)."""

    @property
    def headroom(self) -> int:
        """What appends may still use before the reserve: free plus reusable, minus the
        reserve and the WAL. The WAL's frames are copied into the file at the next
        checkpoint, which may grow it by as much: counted as spent already. (Without
        that, a WAL that grew while readers held checkpoints back took the last bytes
        of a 4 MiB disk under load, the checkpoint could no longer grow the file, and
        no ack fitted any more.)"""
        return self.free_bytes + self.reusable_bytes - self.wal_bytes - self.reserve_bytes

    @property
    def low(self) -> bool:
        """Below the reserve: appends wait."""
        if self.reserve_bytes <= 0:
            return False
        return self.headroom < 0 or self.free_bytes + self.wal_bytes < self.floor_bytes

    def reason(self) -> str:
        """Why appends wait, for readiness and logs."""
        text = f"disk free {format_bytes(self.free_bytes)} below reserve "
        text += format_bytes(self.reserve_bytes)
        if self.reusable_bytes:
            text += f" (plus {format_bytes(self.reusable_bytes)} reusable in the outbox file)"
        return text

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (status ``outbox.disk``)."""
        return {
            "free_bytes": self.free_bytes,
            "total_bytes": self.total_bytes,
            "reusable_bytes": self.reusable_bytes,
            "reserve_bytes": self.reserve_bytes,
            "wal_bytes": self.wal_bytes,
            "low": self.low,
            "reason": self.reason() if self.low else None,
            "since": self.since,
        }


class DiskWatch:
    """Samples free space of the filesystem holding ``directory`` (cheap: one statvfs)."""

    def __init__(self, directory: Path, setting: str | int, wal: Path | None = None) -> None:
        self.directory = directory
        self.setting = setting
        self.wal = wal
        """The outbox's WAL file, if any (its size counts toward the floor)."""
        self.floor: int | None = None
        """The floor in bytes (None: a quarter of the reserve)."""
        self.reusable = 0
        """Free bytes inside the outbox file, as last read (the outbox keeps it current)."""
        self.sampled_at = 0.0
        """When ``state`` was taken (``time.monotonic()``)."""
        self._reserve = (-1, 0)  # (filesystem size, reserve): a resize changes it
        self.state: DiskState = self.sample()

    def sample(self) -> DiskState:
        """Look at the filesystem now; ``state`` is the result (``since`` kept while the
        disk stays low, or fine)."""
        st = os.statvfs(self.directory)
        total = st.f_blocks * st.f_frsize
        if self._reserve[0] != total:
            self._reserve = (total, reserve_bytes(self.setting, total))
        free, reserve = st.f_bavail * st.f_frsize, self._reserve[1]
        wal = 0
        if self.wal is not None:
            with contextlib.suppress(FileNotFoundError):
                wal = self.wal.stat().st_size
        floor = reserve // 4 if self.floor is None else self.floor
        old: DiskState | None = getattr(self, "state", None)
        since = 0.0 if old is None else old.since
        state = DiskState(free, total, self.reusable, reserve, since, wal, floor)
        if old is None or state.low != old.low:
            state = replace(state, since=time.time())
        self.state = state
        self.sampled_at = time.monotonic()
        return self.state

    def admits(self, size: int, queued: int) -> bool:
        """Whether an append of ``size`` bytes may go on now, with ``queued`` bytes
        admitted and not committed yet. With nothing queued, any append may go while the
        disk is not low (an append larger than the headroom must not wait forever)."""
        state = self.state
        if state.reserve_bytes <= 0:
            return True
        if state.low:
            return False
        return queued == 0 or state.headroom - queued - size >= 0

    def used(self, size: int) -> None:
        """``size`` bytes of records were committed: they may have used reusable pages."""
        self.reusable = max(0, self.reusable - size)
