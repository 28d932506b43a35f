"""Report-by-exception: pass a sample only when it says something new.

Shared by the MQTT and Modbus sources (and equipment profiles). Per point:

* ``deadband`` (absolute) or ``deadband_percent`` (of the last reported value): a numeric
  change smaller than this is not reported;
* ``min_interval``: at most one report per interval (a change inside it waits for the next
  sample after it);
* ``max_interval``: a heartbeat; a sample is reported when the last report is this old,
  changed or not (evaluated when a sample arrives);
* a change of quality (good, bad, uncertain...) always passes.

The state is per point (``key``) and means "reported and stored": a check that reports
a sample takes it as the new reference at once, so the caller passes an
:class:`RbeUndo` and rolls the group back when the group's records were not stored (a
failed commit, or a message whose mapping failed half-way). Only the points of that
group go back; every other point keeps its state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.configtypes import PositiveDuration, Section


class ReportByException(Section):
    """Report-by-exception settings of a point (all optional; none means report all)."""

    deadband: float | None = None
    """Smallest absolute change reported."""
    deadband_percent: float | None = None
    """Smallest change reported, in percent of the last reported value."""
    min_interval: PositiveDuration | None = None
    """Report at most once per interval."""
    max_interval: PositiveDuration | None = None
    """Report at least this often while samples arrive (heartbeat)."""


@dataclass(slots=True)
class _Last:
    value: Any
    quality: str | None
    at: float


class RbeUndo:
    """What the checks of one group (a batch, a poll) changed, until its records are stored.

    Groups that are checked concurrently must concern different points (a Modbus
    device is polled by one worker at a time; an MQTT source maps one batch at a time).
    """

    __slots__ = ("changes", "suppressed")

    def __init__(self) -> None:
        self.changes: list[tuple[str, _Last | None]] = []  # (key, state before), in order
        self.suppressed = 0

    def mark(self) -> tuple[int, int]:
        """A point to roll back to (the changes of one message inside a batch)."""
        return len(self.changes), self.suppressed


class RbeFilter:
    """Remembers the last reported sample per key and decides whether to report."""

    def __init__(self) -> None:
        self._last: dict[str, _Last] = {}
        self.suppressed = 0

    def last_value(self, key: str) -> Any:
        """The value last reported for ``key`` (None when none was)."""
        last = self._last.get(key)
        return None if last is None else last.value

    def check(  # noqa: PLR0917 - positional: called per sample
        self,
        key: str,
        value: Any,
        at: float,
        settings: ReportByException | None,
        quality: str | None = None,
        undo: RbeUndo | None = None,
    ) -> bool:
        """True when the sample must be reported (and remember it as reported).

        With ``undo``, what the check changed is recorded there for :meth:`rollback`.
        """
        last = self._last.get(key)
        if settings is None or last is None or quality != last.quality:
            self._last[key] = _Last(value, quality, at)
            if undo is not None:
                undo.changes.append((key, last))
            return True
        elapsed = at - last.at
        report: bool
        if settings.min_interval is not None and elapsed < settings.min_interval:
            report = False
        elif settings.max_interval is not None and elapsed >= settings.max_interval:
            report = True
        else:
            report = self._changed(last.value, value, settings)
        if report:
            self._last[key] = _Last(value, quality, at)
            if undo is not None:
                undo.changes.append((key, last))
        else:
            self.suppressed += 1
            if undo is not None:
                undo.suppressed += 1
        return report

    def rollback(self, undo: RbeUndo, mark: tuple[int, int] = (0, 0)) -> None:
        """Put back the states the checks recorded in ``undo`` changed after ``mark``.

        Their records were not stored: the points must report again what they thought
        they had reported, never less.
        """
        changes, count = mark
        while len(undo.changes) > changes:
            key, before = undo.changes.pop()
            if before is None:
                self._last.pop(key, None)
            else:
                self._last[key] = before
        self.suppressed -= undo.suppressed - count
        undo.suppressed = count

    @staticmethod
    def _changed(old: Any, new: Any, s: ReportByException) -> bool:
        numeric = (int, float)
        if (
            isinstance(old, numeric)
            and isinstance(new, numeric)
            and not isinstance(old, bool)
            and not isinstance(new, bool)
        ):
            delta = abs(new - old)
            if s.deadband is not None and delta <= s.deadband:
                return False
            if s.deadband_percent is not None and delta <= abs(old) * s.deadband_percent / 100:
                return False
            return bool(delta > 0)
        return bool(old != new)
