"""A small tmpfs for disk-full tests: mounted for one test, filled by a filler file."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (``"4m"``) on ``mnt`` (made if needed), unmount after.

    Skips the test, with the reason, when not root or mounting is impossible here.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def free_bytes(path: Path) -> int:
    """Bytes free on the filesystem of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(disk: Path, leave: int) -> Path:
    """Fill the filesystem of ``disk`` but ``leave`` bytes; returns the filler file."""
    filler = disk / "filler"
    with filler.open("ab") as fh, contextlib.suppress(OSError):
        fh.write(b"\0" * max(0, free_bytes(disk) - leave))
    return filler
