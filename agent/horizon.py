"""The buffer horizon: how long the outbox can take in records through an upstream outage
before it must block or drop, at the ingest rate of the last hour.

:class:`Flow` counts what the outbox took in (per retention class: rows and bytes) and
what it delivered, in one bucket per minute for the last hour (61 buckets per series,
whatever the rate: bounded). It lives in memory only: after a restart the horizon says
``measuring`` until ``api.horizon_min_sample`` of data is in, instead of inventing a
number from a few seconds.

:func:`horizon` turns the budget (``outbox.max_bytes``), its use and those rates into
one figure per retention class and what happens when it runs out (see
docs/operations.md, "Buffer horizon"):

* ``outbox.when_full = "block"``: the outbox fills with both classes; when it is full,
  every append blocks (MQTT stops acknowledging, polls and queries pause: the agent
  loses nothing, the broker or the device may). Both classes: ``(budget - used) /
  (business rate + reading rate)``, ``block``.
* ``"drop_oldest"``: readings (meter readings, events) make room for business records.
  Readings: the same time, then the oldest readings are dropped (``drop``). Business
  records: until business bytes alone fill the budget (every reading dropped by then):
  ``(budget - business bytes) / business rate``, ``block``.
* ``outbox.readings_max_age``: a reading is dropped when it is older, outage or not:
  the readings' horizon is at most ``max_age - age of the oldest reading`` (``drop``).

A class with no ingest has no horizon (``None``: it never runs out at this rate). The
agent's horizon is the shortest of its classes': the first time anything blocks or drops.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

BUCKET = 60.0
"""Seconds per bucket."""
WINDOW = 3600.0
"""The rates' window: the last hour."""
_BUCKETS = int(WINDOW // BUCKET) + 1

CLASSES = ("business", "reading")


class _Series:
    """Counts per minute for the last hour: ``(minute, rows, bytes)``, oldest first."""

    __slots__ = ("buckets",)

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque(maxlen=_BUCKETS)

    def add(self, minute: int, rows: int, size: int) -> None:
        last = self.buckets[-1] if self.buckets else None
        if last is not None and last[0] == minute:
            last[1] += rows
            last[2] += size
        else:
            self.buckets.append([minute, rows, size])

    def totals(self, since_minute: int) -> tuple[int, int]:
        rows = size = 0
        for minute, r, b in self.buckets:
            if minute >= since_minute:
                rows += r
                size += b
        return rows, size

    def per_minute(self, now_minute: int) -> list[int]:
        """Rows per minute, the last :data:`_BUCKETS` minutes, oldest first (0s filled in)."""
        by_minute = {m: r for m, r, _ in self.buckets}
        return [by_minute.get(m, 0) for m in range(now_minute - _BUCKETS + 1, now_minute + 1)]


class Flow:
    """What the outbox took in (per class) and delivered, per minute, for the last hour."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.started_at = clock()
        self._in = {cls: _Series() for cls in CLASSES}
        self._out = _Series()

    def _minute(self) -> int:
        return int(self._clock() // BUCKET)

    def ingested(self, per_class: Mapping[str, Sequence[int]]) -> None:
        """Count records committed: ``{class: (rows, bytes)}``."""
        minute = self._minute()
        for cls, (rows, size) in per_class.items():
            series = self._in.get(cls)
            if series is not None and rows:
                series.add(minute, rows, size)

    def delivered(self, rows: int) -> None:
        """Count records the upstream took (acked)."""
        if rows:
            self._out.add(self._minute(), rows, 0)

    def covered(self) -> float:
        """Seconds of the window the counts cover (since start, at most the window)."""
        return min(WINDOW, max(0.0, self._clock() - self.started_at))

    def rates(self) -> dict[str, tuple[float, float]]:
        """``{class: (rows/s, bytes/s)}`` over the covered part of the last hour."""
        now = self._clock()
        span = self.covered()
        since = int((now - span) // BUCKET)
        out: dict[str, tuple[float, float]] = {}
        for cls, series in self._in.items():
            rows, size = series.totals(since)
            out[cls] = (rows / span, size / span) if span > 0 else (0.0, 0.0)
        return out

    def sparklines(self) -> dict[str, list[int]]:
        """Records per minute over the last hour, oldest first: ``ingest`` (both classes)
        and ``delivered``."""
        minute = self._minute()
        columns = zip(*(s.per_minute(minute) for s in self._in.values()), strict=True)
        ingest = [sum(col) for col in columns]
        return {"ingest": ingest, "delivered": self._out.per_minute(minute)}


@dataclass(frozen=True, slots=True)
class ClassHorizon:
    """One retention class: seconds left (None: not running out), and what then."""

    seconds: float | None
    then: Literal["block", "drop"]


@dataclass(frozen=True, slots=True)
class Horizon:
    """The buffer horizon (``measuring`` until enough data is in)."""

    measuring: bool
    seconds: float | None
    then: Literal["block", "drop"] | None
    classes: dict[str, ClassHorizon]
    rates: dict[str, tuple[float, float]]
    covered: float

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (``outbox.horizon`` of /v1/status)."""
        return {
            "state": "measuring" if self.measuring else "known",
            "seconds": None if self.seconds is None else round(self.seconds, 1),
            "then": self.then,
            "text": describe(self),
            "sample_seconds": round(self.covered, 1),
            "classes": {
                cls: {
                    "seconds": None if h.seconds is None else round(h.seconds, 1),
                    "then": h.then,
                    "rows_per_second": round(self.rates.get(cls, (0.0, 0.0))[0], 4),
                    "bytes_per_second": round(self.rates.get(cls, (0.0, 0.0))[1], 2),
                }
                for cls, h in self.classes.items()
            },
        }


def horizon(
    flow: Flow,
    *,
    max_bytes: int,
    used: Mapping[str, int],
    when_full: Literal["block", "drop_oldest"],
    readings_max_age: float | None,
    oldest_reading_age: float | None,
    min_sample: float,
) -> Horizon:
    """The horizon from the budget, its use per class and the flow (module docstring)."""
    rates = flow.rates()
    covered = flow.covered()
    r_business = rates["business"][1]
    r_reading = rates["reading"][1]
    free = max(0, max_bytes - sum(used.values()))
    both = _left(free, r_business + r_reading)
    classes: dict[str, ClassHorizon] = {}
    if when_full == "drop_oldest":
        business_free = max(0, max_bytes - used.get("business", 0))
        classes["business"] = ClassHorizon(_left(business_free, r_business), "block")
        reading = ClassHorizon(both if r_reading > 0 else None, "drop")
    else:
        classes["business"] = ClassHorizon(both if r_business > 0 else None, "block")
        reading = ClassHorizon(both if r_reading > 0 else None, "block")
    if readings_max_age is not None and r_reading > 0:
        aged = max(0.0, readings_max_age - (oldest_reading_age or 0.0))
        if reading.seconds is None or aged < reading.seconds:
            reading = ClassHorizon(aged, "drop")
    classes["reading"] = reading
    known = [(h.seconds, h.then) for h in classes.values() if h.seconds is not None]
    first = min(known, key=lambda k: k[0]) if known else None
    return Horizon(
        measuring=covered < min_sample,
        seconds=None if first is None else first[0],
        then=None if first is None else first[1],
        classes=classes,
        rates=rates,
        covered=covered,
    )


def _left(free: float, rate: float) -> float | None:
    return free / rate if rate > 0 else None


def duration(seconds: float) -> str:
    """``9 days``, ``5 hours``, ``12 minutes``, ``40 seconds``: a rough figure."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= 2 * size:
            n = round(seconds / size)
            return f"{n} {unit}s"
    n = round(seconds)
    return f"{n} second" + ("" if n == 1 else "s")


_THEN = {"drop": "readings are dropped", "block": "sources are paused (block)"}


def describe(h: Horizon) -> str:
    """The horizon in words: ``about 9 days at the current rate, then readings are
    dropped``."""
    if h.measuring:
        return f"measuring ({duration(h.covered)} of data so far)"
    if h.seconds is None:
        return "no limit at the current rate (nothing coming in)"
    what = _THEN[h.then or "block"]
    if h.seconds <= 0:
        return f"out of room now: {what}"
    return f"about {duration(h.seconds)} at the current rate, then {what}"
