"""The rules engine: records in, rule events and maintenance requests out. No I/O.

Per rule and asset the engine holds a small state machine (clear, pending, raised). Its
durable part (raised or not, since when, the open request, a pending ``for`` delay) is
written as one cursor per rule and asset (``rules/<rule>/<asset>``) in the same outbox
transaction as the records that changed it, so a restart neither forgets a raised rule
nor raises it again.
What is not persisted: sliding windows of ``rate`` rules and the last-seen times of
``stale`` rules (both start afresh at start-up; docs/rules.md says so).

Times: rule changes caused by a record happen at the record's ``observed_at``; changes
caused by the timer (stale data, ``for`` delays, a window sliding) at the tick's time.
Ids are deterministic: a rule event is one observation (its id covers source, asset,
rule, time to the microsecond and the event's fields, see
:meth:`agent.records.Record.reading`) and a request's ``remote_id`` derives from (asset,
rule, raise time to the microsecond), so a redelivered message gives the same records and
two transitions never share an id.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.outbox import Cursor
from agent.records import EntityType, Record, SourceRef, format_observed
from agent.rules.config import RuleConfig

CURSOR_PREFIX = "rules/"


def _norm(value: Any) -> str:
    """A comparable text form: ``True``/``"true"``/``1``... compare as the user wrote them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value))
    except (TypeError, ValueError):
        return None


def _dt(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


@dataclass
class State:
    """One rule on one asset. The first six fields are persisted."""

    raised: bool = False
    raised_at: float | None = None
    cleared_at: float | None = None
    pending_since: float | None = None
    request: str | None = None
    site: str | None = None
    last_seen: float | None = None
    last_value: Any = None
    window: deque[tuple[float, float]] = field(default_factory=deque)
    last_counter: float | None = None

    _KEYS = ("raised", "raised_at", "cleared_at", "pending_since", "request", "site")

    def persisted(self) -> dict[str, Any]:
        """The durable part, as stored in the rule's cursor."""
        return {k: getattr(self, k) for k in self._KEYS}

    def load(self, saved: dict[str, Any]) -> None:
        """Take back a durable part."""
        for key in self._KEYS:
            setattr(self, key, saved.get(key))
        self.raised = bool(self.raised)


@dataclass(slots=True)
class _On:
    """The rule, asset, its state and the source ref a transition concerns."""

    rule: RuleConfig
    asset: str
    st: State
    ref: SourceRef


@dataclass
class Evaluation:
    """What one observe/tick did: records to commit (inputs included), rule cursors."""

    records: list[Record] = field(default_factory=list)
    cursors: list[Cursor] = field(default_factory=list)
    before: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    emitted: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    """What happened (raised, cleared, requests...); counted once committed."""

    @property
    def changed(self) -> bool:
        """Whether any rule state changed (then the cursors must commit with the records)."""
        return bool(self.before)


class RuleEngine:
    """Evaluates the rules of one source."""

    def __init__(self, source: str, rules: list[RuleConfig], ref: SourceRef) -> None:
        self.source = source
        self.rules = {r.name: r for r in rules}
        self.ref = ref
        self.states: dict[str, dict[str, State]] = {r.name: {} for r in rules}
        self.by_point: dict[str, list[RuleConfig]] = {}
        for rule in rules:
            self.by_point.setdefault(rule.point, []).append(rule)
        self.counters: Counter[str] = Counter()
        self.wanted = {r.name: frozenset(_norm(v) for v in r.values) for r in rules}

    # ------------------------------------------------------------------ persistence

    @staticmethod
    def cursor_key(rule: str, asset: str) -> str:
        """The cursor key holding the durable state of a rule on an asset."""
        return f"{CURSOR_PREFIX}{rule}/{asset}"

    def restore(self, cursors: dict[str, Any], now: float) -> None:
        """Load durable states from the source's cursors (``rules/<rule>/<asset>`` keys;
        others are ignored) and start the stale clocks of fixed assets."""
        for key, value in cursors.items():
            if not key.startswith(CURSOR_PREFIX) or not isinstance(value, dict):
                continue
            name, _, asset = key.removeprefix(CURSOR_PREFIX).partition("/")
            rule = self.rules.get(name)
            if rule is not None and asset:
                self._state(rule, asset).load(value)
        for rule in self.rules.values():
            for asset in rule.fixed_assets:
                st = self._state(rule, asset)
                st.last_seen = st.last_seen or now

    def _state(self, rule: RuleConfig, asset: str) -> State:
        states = self.states[rule.name]
        st = states.get(asset)
        if st is None:
            st = states[asset] = State()
        return st

    def _touch(self, ev: Evaluation, rule: RuleConfig, asset: str, st: State) -> None:
        """Remember a state's durable part before it changes (for undo and the cursor)."""
        ev.before.setdefault((rule.name, asset), st.persisted())

    def _finish(self, ev: Evaluation) -> Evaluation:
        for name, asset in ev.before:
            value = self.states[name][asset].persisted()
            ev.cursors.append(Cursor(self.source, self.cursor_key(name, asset), value))
        return ev

    def committed(self, ev: Evaluation) -> None:
        """``ev`` is durable: count what it did."""
        self.counters.update(ev.counts)

    def undo(self, ev: Evaluation) -> None:
        """The commit of ``ev`` failed: put the durable states back as they were."""
        for (name, asset), saved in ev.before.items():
            self.states[name][asset].load(saved)
        self.counters["commits_failed"] += 1

    # ------------------------------------------------------------------ evaluation

    def observe(self, records: list[Record] | tuple[Record, ...], now: float) -> Evaluation:
        """Evaluate rules on records; the result holds the inputs with rule records after
        each record that caused them."""
        ev = Evaluation()
        for record in records:
            ev.records.append(record)
            data = record.data
            point = data.get("point") if isinstance(data, dict) else None
            rules = self.by_point.get(point) if isinstance(point, str) else None
            if not rules:
                continue
            asset = str(data.get("asset_remote_id") or data.get("device") or record.remote_id)
            at = datetime.fromisoformat(record.observed_at).timestamp()
            for rule in rules:
                if rule.matches_asset(asset):
                    self._on_record(
                        ev,
                        _On(rule, asset, self._state(rule, asset), record.source),
                        record,
                        at,
                        now,
                    )
        return self._finish(ev)

    def tick(self, now: float) -> Evaluation:
        """Timer: stale data, ``for`` delays that elapsed, windows that slid."""
        ev = Evaluation()
        for name, states in self.states.items():
            rule = self.rules[name]
            for asset, st in states.items():
                self._on_tick(ev, rule, asset, st, now)
        return self._finish(ev)

    def _value(self, rule: RuleConfig, record: Record) -> Any:
        data = record.data
        if rule.field is not None:
            return data.get(rule.field)
        if record.entity_type is EntityType.EVENT:
            return data["code"] if "code" in data else data.get("state")
        return data.get("value")

    def _on_record(self, ev: Evaluation, on: _On, record: Record, at: float, now: float) -> None:
        rule, asset, st, ref = on.rule, on.asset, on.st, on.ref
        value = self._value(rule, record)
        st.last_seen = now
        st.last_value = value
        if rule.type == "stale":
            if st.raised:
                self._clear(ev, _On(rule, asset, st, ref), at, value)
            return
        if rule.type == "rate":
            self._rate(ev, _On(rule, asset, st, ref), at, value)
            return
        active = self._active(rule, st, value)
        if active is None:
            ev.counts["not_comparable"] += 1
            return
        if st.raised:
            if not active:
                self._clear(ev, _On(rule, asset, st, ref), at, value)
            return
        if not active:
            if st.pending_since is not None:
                self._touch(ev, rule, asset, st)
                st.pending_since = None
            return
        if rule.for_ > 0:
            if st.pending_since is None:
                self._touch(ev, rule, asset, st)
                st.pending_since, st.site = at, ref.site
            if at - st.pending_since < rule.for_:
                return
            at = st.pending_since + rule.for_
        self._raise(ev, _On(rule, asset, st, ref), at, value)

    def _active(self, rule: RuleConfig, st: State, value: Any) -> bool | None:
        """Whether the raise condition holds (raised: whether the clear condition fails)."""
        if rule.type == "state":
            return _norm(value) in self.wanted[rule.name] if value is not None else None
        number = _number(value)
        if number is None:
            return None
        if rule.above is not None:
            limit = rule.above if not st.raised else _or(rule.clear_below, rule.above)
            return number > limit if not st.raised else number >= limit
        assert rule.below is not None
        limit = rule.below if not st.raised else _or(rule.clear_above, rule.below)
        return number < limit if not st.raised else number <= limit

    def _rate(self, ev: Evaluation, on: _On, at: float, value: Any) -> None:
        rule, st = on.rule, on.st
        amount = 0.0
        if rule.mode == "count":
            wanted = self.wanted[rule.name]
            amount = 1.0 if not wanted or _norm(value) in wanted else 0.0
        else:
            number = _number(value)
            if number is None:
                ev.counts["not_comparable"] += 1
                return
            if st.last_counter is not None:
                amount = number - st.last_counter if number >= st.last_counter else number
            st.last_counter = number
        if amount > 0:
            st.window.append((at, amount))
        self._slide(ev, on, at, value)

    def _slide(self, ev: Evaluation, on: _On, at: float, value: Any) -> None:
        rule, st = on.rule, on.st
        while st.window and st.window[0][0] <= at - rule.per:
            st.window.popleft()
        total = sum((a for _, a in st.window), 0.0)
        assert rule.max is not None
        if not st.raised and total > rule.max:
            self._raise(ev, on, at, total)
        elif st.raised and total <= _or(rule.clear_at, rule.max):
            self._clear(ev, on, at, total)

    def _on_tick(self, ev: Evaluation, rule: RuleConfig, asset: str, st: State, now: float) -> None:
        ref = SourceRef(self.ref.name, self.ref.system, st.site or self.ref.site)
        if rule.type == "stale":
            assert rule.after is not None
            if not st.raised and st.last_seen is not None and now - st.last_seen >= rule.after:
                self._raise(ev, _On(rule, asset, st, ref), st.last_seen + rule.after, None)
        elif rule.type == "rate":
            if st.raised or st.window:
                self._slide(ev, _On(rule, asset, st, ref), now, None)
        elif not st.raised and st.pending_since is not None and now - st.pending_since >= rule.for_:
            self._raise(ev, _On(rule, asset, st, ref), st.pending_since + rule.for_, st.last_value)

    # ------------------------------------------------------------------ transitions

    def _raise(self, ev: Evaluation, on: _On, at: float, value: Any) -> None:
        rule, asset, st, ref = on.rule, on.asset, on.st, on.ref
        self._touch(ev, rule, asset, st)
        previous_clear = st.cleared_at
        st.raised, st.raised_at, st.cleared_at, st.pending_since = True, at, None, None
        st.site = ref.site
        ev.counts["raised"] += 1
        request = rule.maintenance_request
        new_request: Record | None = None
        if request is not None:
            still_open = st.request is not None and (
                previous_clear is None or at - previous_clear < request.hold
            )
            if still_open:
                ev.counts["request_held"] += 1
            else:
                st.request = _request_id(asset, rule.name, at, st.request)
                new_request = self._request(on, at, value)
                ev.counts["requests"] += 1
        elif st.request is not None:
            st.request = None
        ev.records.append(self._event(on, "raised", at, value))
        if new_request is not None:
            ev.records.append(new_request)
        ev.emitted += 1 + (new_request is not None)

    def _clear(self, ev: Evaluation, on: _On, at: float, value: Any) -> None:
        rule, asset, st = on.rule, on.asset, on.st
        self._touch(ev, rule, asset, st)
        st.raised, st.cleared_at, st.pending_since = False, at, None
        ev.counts["cleared"] += 1
        ev.records.append(self._event(on, "cleared", at, value))
        ev.emitted += 1

    def _fields(self, rule: RuleConfig, asset: str, value: Any) -> dict[str, Any]:
        return {"asset": asset, "rule": rule.name, "value": value, "point": rule.point}

    def _event(self, on: _On, state: str, at: float, value: Any) -> Record:
        rule, asset, st, ref = on.rule, on.asset, on.st, on.ref
        assert st.raised_at is not None
        data: dict[str, Any] = {
            "asset_remote_id": asset,
            "point": rule.point,
            "event_type": "rule",
            "rule": rule.name,
            "rule_type": rule.type,
            "state": state,
            "code": rule.code or rule.name,
            "severity": rule.severity if state == "raised" else "none",
            "text": rule.message.format_map(self._fields(rule, asset, value)),
            "value": value,
            "raised_at": format_observed(_dt(st.raised_at)),
            "cleared_at": None if st.cleared_at is None else format_observed(_dt(st.cleared_at)),
            "maintenance_request_remote_id": st.request,
        }
        return Record.reading(ref, EntityType.EVENT, f"{asset}/rule/{rule.name}", _dt(at), data)

    def _request(self, on: _On, at: float, value: Any) -> Record:
        rule, asset, st, ref = on.rule, on.asset, on.st, on.ref
        conf = rule.maintenance_request
        assert conf is not None
        assert st.request is not None
        fields = self._fields(rule, asset, value)
        fields["message"] = rule.message.format_map(fields)
        data: dict[str, Any] = {
            "asset_remote_id": asset,
            "title": conf.title.format_map(fields),
            "description": conf.description.format_map(fields),
            "priority": conf.priority,
            "status": "open",
            "origin": "edge_rule",
            "rule": rule.name,
            "code": rule.code or rule.name,
            "severity": rule.severity,
            "raised_at": format_observed(_dt(at)),
            "trigger": {"point": rule.point, "value": value},
        }
        when = _dt(at)
        return Record.entity(
            ref,
            EntityType.MAINTENANCE_REQUEST,
            st.request,
            data,
            source_modified_at=when,
            observed_at=when,
        )


_COMPACT = "%Y%m%dT%H%M%S.%fZ"


def _request_id(asset: str, rule: str, at: float, previous: str | None) -> str:
    """A new request's ``remote_id``: ``<asset>/<rule>/<raise time>``.

    The time in it is moved 1 µs past the previous request's when it is not later (raise,
    clear, raise in one instant with ``hold = 0``; input out of time order), so the
    times in a rule's request ids only grow and two requests never share an id. The
    request's ``raised_at`` stays the true raise time.
    """
    when = _dt(at)
    if previous is not None:
        try:
            last = datetime.strptime(previous.rsplit("/", 1)[-1], _COMPACT).replace(tzinfo=UTC)
        except ValueError:  # not one of ours (a request id of another version)
            last = None
        if last is not None and when <= last:
            when = last + timedelta(microseconds=1)
    return f"{asset}/{rule}/{when.strftime('%Y%m%dT%H%M%S.')}{when.microsecond:06d}Z"


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
