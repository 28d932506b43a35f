"""Report-by-exception: pass a sample only when it says something new.

Shared by the MQTT and Modbus sources (and equipment profiles). Per point:

* ``deadband`` (absolute) or ``deadband_percent`` (of the last reported value): a numeric
  change smaller than this is not reported;
* ``min_interval``: at most one report per interval (a change inside it waits for the next
  sample after it);
* ``max_interval``: a heartbeat; a sample is reported when the last report is this old,
  changed or not (evaluated when a sample arrives);
* a change of quality (good, bad, uncertain...) always passes.
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


class RbeFilter:
    """Remembers the last reported sample per key and decides whether to report."""

    def __init__(self) -> None:
        self._last: dict[str, _Last] = {}
        self.suppressed = 0

    def check(
        self,
        key: str,
        value: Any,
        at: float,
        settings: ReportByException | None,
        quality: str | None = None,
    ) -> bool:
        """True when the sample must be reported (and remember it as reported)."""
        last = self._last.get(key)
        if settings is None or last is None or quality != last.quality:
            self._last[key] = _Last(value, quality, at)
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
        else:
            self.suppressed += 1
        return report

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
