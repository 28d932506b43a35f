"""sd_notify without a dependency: READY=1, WATCHDOG=1, STOPPING=1, RELOADING=1.

All calls are no-ops when the agent is not run by systemd (no ``NOTIFY_SOCKET``).
"""

from __future__ import annotations

import os
import socket
import time

import structlog

log = structlog.get_logger("agent.systemd")


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``) to systemd. Returns False when not under it."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall("\n".join(states).encode())
    except OSError as exc:
        # A lost notification must not take the daemon down; systemd's own timeouts
        # (start, watchdog) will say loudly enough if this keeps happening.
        log.warning("sd_notify_failed", states=list(states), error=str(exc))
        return False
    return True


def reloading() -> bool:
    """Tell systemd a reload started (``RELOADING=1`` needs ``MONOTONIC_USEC``)."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
