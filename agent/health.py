"""Typed health: one state per component, with a reason and a since; readiness in ONE place.

Every component (a source and its parts: devices, entities; the upstream and its sink;
the outbox) reports a :class:`Health`: a :class:`State`, the reason in words, and since
when it is in that state. Components keep theirs in a :class:`Tracker`. ``/readyz``,
``/v1/status``, ``/metrics`` and ``edge-agent status`` all show the same
:class:`Component` objects, and :func:`readiness` is the only code that decides what
they mean for readiness. The rules (also in docs/operations.md, "Readiness"):

=============  =================================================================
state          readiness
=============  =================================================================
``ok``         ready.
``disabled``   ready (switched off on purpose: a disabled source).
``degraded``   ready, with a warning naming the reason (one Modbus device of
               several off, one SQL entity failing its sync) - unless the component
               has parts and none of them works: then not ready ("no device
               answers").
``starting``   NOT ready: nothing proven yet (an MQTT source's first connect, an SQL
               source restoring its state or before any entity read a row, a Modbus
               source before any device answered). A healthy peer leaves it within a
               second or two.
``retrying``   NOT ready: the component moves no data now and retries (broker or
               upstream unreachable, a device probed after failed polls, a source none
               of whose devices answers or entities syncs).
``blocked``    NOT ready: working, but held back (the outbox over its byte budget,
               or its disk below ``outbox.disk_reserve``, pauses every source).
``reauthorization_required``  NOT ready: credentials refused; a person must act.
``failed``     NOT ready: crashed and waiting for its restart, or crash-looping
               (:class:`RestartLog`: ``N`` restarts within ``M`` minutes, however
               well it runs between them), or an outbox that cannot write.
``stopped``    NOT ready: stopped (the agent is shutting down).
=============  =================================================================

A source with parts takes its own state from theirs (:func:`rollup`). One agent-wide
rule beside the components: the oldest undelivered record older than
``api.ready_max_oldest_age`` is not ready either (the delivery objective).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class State(enum.StrEnum):
    """A component's state (see the module docstring for what each means)."""

    STARTING = "starting"
    OK = "ok"
    DEGRADED = "degraded"
    RETRYING = "retrying"
    BLOCKED = "blocked"
    REAUTH = "reauthorization_required"
    FAILED = "failed"
    STOPPED = "stopped"
    DISABLED = "disabled"


WORKING = frozenset({State.OK, State.DEGRADED, State.STARTING, State.DISABLED})
"""States of a part that does its job, or may yet (the "no part works" rule)."""
_READY = frozenset({State.OK, State.DEGRADED, State.DISABLED})


class Kind(enum.StrEnum):
    """What a component is."""

    SOURCE = "source"
    DEVICE = "device"
    ENTITY = "entity"
    UPSTREAM = "upstream"
    SINK = "sink"
    OUTBOX = "outbox"


# How a part that works is said, for "source s: no device answers (d0, d1)" and
# "devices not answering: d1".
_WORKS = {Kind.DEVICE: "answers", Kind.ENTITY: "syncs"}
_WORKING = {Kind.DEVICE: "answering", Kind.ENTITY: "syncing"}
_PLURAL = {Kind.DEVICE: "devices", Kind.ENTITY: "entities"}


@dataclass(frozen=True, slots=True)
class Health:
    """One component's state, why (``None`` when there is nothing to say), and since when
    (Unix time). ``detail`` is the component's own word for it when that says more (an
    MQTT source ``reconnecting``, a Modbus device ``demoted``)."""

    state: State
    reason: str | None = None
    since: float = 0.0
    detail: str | None = None

    @property
    def word(self) -> str:
        """How the state reads in messages: ``retrying``, with the component's own word
        when it has one: ``retrying (reconnecting)``."""
        return f"{self.state.value} ({self.detail})" if self.detail else self.state.value

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "state": self.state.value,
            "reason": self.reason,
            "since": self.since,
            "detail": self.detail,
        }


class Tracker:
    """Holds a component's current :class:`Health`; ``since`` moves only when the state
    (or its detail word) changes, not when only the reason's text does."""

    def __init__(
        self,
        state: State = State.STARTING,
        reason: str | None = None,
        clock: Callable[[], float] = time.time,
        detail: str | None = None,
    ) -> None:
        self._clock = clock
        self.health = Health(state, reason, clock(), detail)

    def set(self, state: State, reason: str | None = None, detail: str | None = None) -> Health:
        """Enter ``state`` (or stay in it with a new reason); returns the new health."""
        old = self.health
        since = old.since if (old.state, old.detail) == (state, detail) else self._clock()
        self.health = Health(state, reason, since, detail)
        return self.health

    @property
    def state(self) -> State:
        """The current state."""
        return self.health.state


@dataclass(frozen=True, slots=True)
class Component:
    """A component's health and its parts' (a source's devices or entities)."""

    kind: Kind
    name: str
    health: Health
    parts: tuple[Component, ...] = ()

    @property
    def label(self) -> str:
        """``source plant``, or ``upstream`` for the one upstream."""
        return f"{self.kind.value} {self.name}" if self.name else self.kind.value

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view: the health, and the parts' by name."""
        out = self.health.as_dict()
        if self.parts:
            out["parts"] = {p.name: {"kind": p.kind.value, **p.as_dict()} for p in self.parts}
        return out


def parts(kind: Kind, healths: Mapping[str, Health]) -> tuple[Component, ...]:
    """Parts of one kind from their healths by name."""
    return tuple(Component(kind, name, h) for name, h in healths.items())


def down_parts(component: Component) -> list[str]:
    """Names of the component's parts that do not work now, sorted."""
    return sorted(p.name for p in component.parts if p.health.state not in WORKING)


def rollup(kind: Kind, members: Sequence[Component]) -> tuple[State, str | None]:
    """A source's own state from its parts' (Modbus devices, SQL entities):

    * a part whose credentials are refused: ``reauthorization_required`` (its reason);
    * no part works: ``retrying``, "no device answers (d0, d1)";
    * some parts do not work: ``degraded``, "devices not answering: d1 (timeout)";
    * every part still ``starting``: ``starting``, "no device answers yet";
    * else (no parts at all, too): ``ok``.
    """
    if not members:
        return State.OK, None
    for p in members:
        if p.health.state is State.REAUTH:
            return State.REAUTH, f"{p.label}: {p.health.reason or '-'}"
    down = [p for p in members if p.health.state not in WORKING]
    works, working = _WORKS.get(kind, "works"), _WORKING.get(kind, "working")
    if len(down) == len(members):
        names = ", ".join(sorted(p.name for p in down))
        return State.RETRYING, f"no {kind.value} {works} ({names})"
    if down:
        first = min(down, key=lambda p: p.name)
        names = ", ".join(sorted(p.name for p in down))
        plural = _PLURAL.get(kind, f"{kind.value}s")
        return State.DEGRADED, f"{plural} not {working}: {names} ({first.health.reason or '-'})"
    if all(p.health.state is State.STARTING for p in members):
        return State.STARTING, f"no {kind.value} {works} yet"
    return State.OK, None


@dataclass(frozen=True, slots=True)
class Readiness:
    """What ``/readyz`` answers: ready, and why not (reasons) or what is partly wrong."""

    ready: bool
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (the ``/readyz`` body)."""
        return {"ready": self.ready, "reasons": self.reasons, "warnings": self.warnings}


DISK_LOW = "disk_low"
"""The detail of an outbox ``blocked`` because its disk is below the reserve."""

# The outbox says its not-ready reasons in its own words (they were so before health
# was typed, and alerts and runbooks quote them), by state and detail.
_OUTBOX_TEXT = {
    (State.FAILED, None): "outbox write failed: {reason}",
    (State.BLOCKED, None): "outbox is over its byte budget: {reason}",
    (State.BLOCKED, DISK_LOW): "outbox: {reason}",
}


def _not_ready(c: Component) -> str:
    h = c.health
    text = _OUTBOX_TEXT.get((h.state, h.detail)) if c.kind is Kind.OUTBOX else None
    if text is not None:
        return text.format(reason=h.reason or "-")
    return f"{c.label} is {h.word}: {h.reason or '-'}"


def judge(component: Component) -> tuple[str | None, str | None]:
    """``(reason, warning)`` for one component by the rules above (None: nothing)."""
    h = component.health
    if h.state not in _READY:
        return _not_ready(component), None
    if h.state is not State.DEGRADED:
        return None, None
    down = down_parts(component)
    if component.parts and len(down) == len(component.parts):
        kind = component.parts[0].kind
        works = _WORKS.get(kind, "works")
        return f"{component.label}: no {kind.value} {works} ({', '.join(down)})", None
    return None, f"{component.label} is degraded: {h.reason or '-'}"


def readiness(
    components: Iterable[Component],
    *,
    oldest_age: float | None = None,
    max_oldest_age: float | None = None,
    horizon: float | None = None,
    horizon_warn: float | None = None,
    horizon_text: str = "",
) -> Readiness:
    """THE readiness decision: every component by :func:`judge`, then the delivery
    objective (the oldest undelivered record no older than ``max_oldest_age``), then the
    buffer horizon (``horizon`` seconds, None while measuring or unlimited: a warning
    below ``horizon_warn``, never not ready: nothing is lost yet)."""
    reasons: list[str] = []
    warnings: list[str] = []
    for component in components:
        reason, warning = judge(component)
        if reason is not None:
            reasons.append(reason)
        if warning is not None:
            warnings.append(warning)
    if oldest_age is not None and max_oldest_age is not None and oldest_age > max_oldest_age:
        reasons.append(
            f"oldest undelivered record is {oldest_age:.0f}s old (limit {max_oldest_age:.0f}s)"
        )
    if horizon is not None and horizon_warn is not None and horizon < horizon_warn:
        warnings.append(
            f"buffer horizon is {horizon_text or f'{horizon:.0f}s'} "
            f"(warn below {horizon_warn:.0f}s)"
        )
    return Readiness(not reasons, reasons, warnings)


def is_up(health: Health) -> bool:
    """Whether ``/metrics`` shows the component as up (``*_up`` gauges): fully working.
    A degraded source is down there (its parts tell which), as it was before."""
    return health.state in (State.OK, State.DISABLED)


def part_up(health: Health) -> bool:
    """Whether a part (a device) shows as up in ``/metrics``: working or not yet known."""
    return health.state in WORKING


class RestartLog:
    """Restarts of one supervised component, to tell a crash loop from a one-off crash.

    ``restarts`` or more restarts within ``window`` seconds is a crash loop: the
    component is ``failed`` ("crash-looping: N restarts in M minutes") even while it
    runs between two crashes, until the window holds fewer again.
    """

    def __init__(
        self, restarts: int, window: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.restarts = restarts
        self.window = window
        self._clock = clock
        self._times: deque[float] = deque(maxlen=max(1, restarts))

    def reconfigure(self, restarts: int, window: float) -> None:
        """New thresholds (a config reload), keeping the restarts seen so far."""
        self.restarts, self.window = restarts, window
        self._times = deque(self._times, maxlen=max(1, restarts))

    def record(self) -> None:
        """Note one restart now."""
        self._times.append(self._clock())

    def looping(self) -> str | None:
        """The crash-loop reason when the component crash-loops now, else None."""
        if len(self._times) < self.restarts:
            return None
        span = self._clock() - self._times[0]
        if span > self.window:
            return None
        minutes = max(1, round(self.window / 60))
        return f"crash-looping: {len(self._times)} restarts in {minutes} minutes"


def supervised(
    own: Health, tracker: Tracker, restarts: RestartLog, running: bool, error: str | None
) -> Health:
    """A supervised component's health: crash-looping or waiting for a restart is
    ``failed`` whatever the component last said; else what it says (``own``)."""
    looping = restarts.looping()
    if looping is not None:
        return tracker.set(State.FAILED, f"{looping}; last error: {error or '-'}")
    if not running:
        return tracker.set(State.FAILED, error)
    # Mirror what is shown, so that the next crash's ``since`` is its own.
    tracker.set(own.state, own.reason, own.detail)
    return own


def worst(healths: Sequence[Health]) -> Health:
    """The least ready of several healths of one component (its own view, its sink's)."""
    order = [
        State.FAILED,
        State.REAUTH,
        State.RETRYING,
        State.BLOCKED,
        State.STOPPED,
        State.STARTING,
        State.DEGRADED,
        State.OK,
        State.DISABLED,
    ]
    return min(healths, key=lambda h: order.index(h.state))
