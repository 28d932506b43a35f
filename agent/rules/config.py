"""Configuration of edge rules (``[[sources.<name>.rules]]``); see docs/rules.md.

The docstrings of these classes are the user documentation.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Literal

from pydantic import Field, model_validator

from agent.codes import Severity
from agent.configtypes import Duration, PositiveDuration, Section

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class RequestConfig(Section):
    """The ``maintenance_request`` a rule opens when it raises (``maintenance_request =
    {...}``). One request per asset and rule is open at a time."""

    title: str = "{message}"
    """Request title; ``{asset}``, ``{rule}``, ``{message}``, ``{value}``, ``{point}`` are
    replaced."""
    description: str = ""
    """Longer text (same placeholders)."""
    priority: Literal["low", "medium", "high", "urgent"] = "medium"
    """Priority of the request."""
    hold: Duration = 86400.0
    """After the rule clears, the request counts as open for this long: a re-raise within
    it is an event only, not a second request. Later raises open a new request."""


class RuleConfig(Section):
    """One edge rule, evaluated on the records of its source before they are committed.

    A rule watches one point of every matching asset. It is ``raised`` or ``clear`` per
    asset; each change emits an ``event`` record in the same outbox transaction as the
    reading that caused it (timer-driven changes: stale data, ``for`` delays, sliding
    windows, commit on their own).
    """

    name: str
    """Rule name, unique in its source (part of record ids: do not rename casually)."""
    type: Literal["threshold", "state", "rate", "stale"]
    """``threshold``: numeric limit with hysteresis. ``state``: the value is one of
    ``values`` (e.g. out of service, a fault code). ``rate``: more than ``max`` matching
    records (or counter increase) within ``per``. ``stale``: no record for ``after``."""
    point: str
    """Point name the rule watches (the records' ``data.point``)."""
    assets: list[str] = Field(default_factory=list)
    """Asset remote ids (shell patterns allowed, ``LIFT-*``). Empty: every asset. Plain
    ids are watched from start-up, so a ``stale`` rule also fires for an asset that never
    reported."""
    field: str | None = None
    """Which data field is tested. Default: ``value`` for readings; for events ``code``
    when present, else ``state``."""
    above: float | None = None
    """``threshold``: raise when the value is above this ..."""
    clear_below: float | None = None
    """... and clear only when it falls below this (hysteresis; default ``above``)."""
    below: float | None = None
    """``threshold``: raise when the value is below this ..."""
    clear_above: float | None = None
    """... and clear only when it rises above this (default ``below``)."""
    values: list[Any] = Field(default_factory=list)
    """``state``: raise while the value is one of these. ``rate`` with ``count``: count
    only records whose value is one of these (empty: every record)."""
    max: float | None = None
    """``rate``: raise when the count (or increase) within ``per`` exceeds this ..."""
    clear_at: float | None = None
    """... and clear when it is at or below this again (default ``max``)."""
    per: PositiveDuration = 3600.0
    """``rate``: the sliding window."""
    mode: Literal["count", "increase"] = "count"
    """``rate``: ``count`` matching records, or the ``increase`` of a counter value (a
    counter that goes backwards is taken as reset)."""
    after: PositiveDuration | None = None
    """``stale``: raise when the point of an asset has had no record for this long."""
    for_: Duration = Field(0.0, alias="for")
    """Delay-on: the condition must hold this long before the rule raises (``state`` with
    ``for = "15m"``: out of service for more than 15 minutes)."""
    severity: Severity = "major"
    """Severity of the raised event."""
    code: str | None = None
    """Normalized event code (default: the rule name)."""
    message: str = "{rule} on {asset}"
    """Event text (``{asset}``, ``{rule}``, ``{value}``, ``{point}``)."""
    maintenance_request: RequestConfig | None = None
    """Open a maintenance request when the rule raises (absent: events only)."""

    model_config = Section.model_config | {"populate_by_name": True}

    @model_validator(mode="after")
    def _check(self) -> RuleConfig:
        if not _NAME.match(self.name):
            raise ValueError(f"rule name {self.name!r}: use letters, digits, '_', '-', '.'")
        need = {
            "threshold": self.above is not None or self.below is not None,
            "state": bool(self.values),
            "rate": self.max is not None,
            "stale": self.after is not None and self.after > 0,
        }
        if not need[self.type]:
            hint = {
                "threshold": "'above' or 'below'",
                "state": "'values'",
                "rate": "'max'",
                "stale": "'after'",
            }[self.type]
            raise ValueError(f"a {self.type} rule needs {hint}")
        if self.above is not None and self.below is not None:
            raise ValueError("set either 'above' or 'below', not both (use two rules)")
        if self.above is not None and (self.clear_below or self.above) > self.above:
            raise ValueError("clear_below must not be above 'above'")
        if self.below is not None and (self.clear_above or self.below) < self.below:
            raise ValueError("clear_above must not be below 'below'")
        return self

    def matches_asset(self, asset: str) -> bool:
        """Whether this rule watches ``asset``."""
        return not self.assets or any(fnmatch.fnmatchcase(asset, p) for p in self.assets)

    @property
    def fixed_assets(self) -> list[str]:
        """The assets named without wildcards (watched from start-up)."""
        return [a for a in self.assets if not any(c in a for c in "*?[")]


def check_unique(rules: list[RuleConfig]) -> list[RuleConfig]:
    """Rule names must be unique within a source."""
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise ValueError(f"duplicate rule name {rule.name!r}")
        seen.add(rule.name)
    return rules
