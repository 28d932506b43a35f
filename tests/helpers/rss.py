"""Peak resident memory of this process (or another) over a block of a test.

``with RssPeak() as rss: ...`` then ``rss.growth``: how far the resident set size rose
above its value at the start of the block. The peak is the kernel's own high-water mark
(``VmHWM``, reset at the start through ``/proc/<pid>/clear_refs``), so a short spike
between two samples is not missed; where that reset is not allowed, a thread samples
``VmRSS`` every few milliseconds instead. Memory bounds are asserted on ``growth``, with
the bound and its reasoning written beside the assert.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from types import TracebackType

MIB = 1 << 20


def _status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert match is not None, f"no {field} in /proc/{pid}/status"
    return int(match.group(1))


def rss_bytes(pid: int | None = None) -> int:
    """The resident set size of ``pid`` (default: this process), in bytes."""
    return _status_kib(pid or os.getpid(), "VmRSS") * 1024


class RssPeak:
    """The peak resident set size of a process while the ``with`` block runs."""

    def __init__(self, pid: int | None = None, interval: float = 0.005) -> None:
        self.pid = pid or os.getpid()
        self.interval = interval
        self.start = 0
        self.sampled_peak = 0
        self.samples: list[int] = []
        self._hwm = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="rss-sampler")

    def __enter__(self) -> RssPeak:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # reset VmHWM to VmRSS
            self._hwm = True
        except OSError:
            self._hwm = False
        self.start = rss_bytes(self.pid)
        self.sampled_peak = self.start
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        if self._hwm:
            self.sampled_peak = max(self.sampled_peak, _status_kib(self.pid, "VmHWM") * 1024)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                now = rss_bytes(self.pid)
            except (OSError, AssertionError):
                return  # the process ended
            self.samples.append(now)
            self.sampled_peak = max(self.sampled_peak, now)

    @property
    def peak(self) -> int:
        """The highest resident set size seen, in bytes."""
        return self.sampled_peak

    @property
    def growth(self) -> int:
        """How far the resident set size rose above its value at the start, in bytes."""
        return self.peak - self.start

    def describe(self) -> str:
        """``start -> peak (+growth)`` in MiB, for assertion messages and reports."""
        how = "VmHWM" if self._hwm else f"{len(self.samples)} samples"
        return (
            f"RSS {self.start / MIB:.1f} -> {self.peak / MIB:.1f} MiB "
            f"(+{self.growth / MIB:.1f} MiB, {how})"
        )
