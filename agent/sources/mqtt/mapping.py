"""From an MQTT message to records: topic matching, payload paths, types, RBE.

:class:`Mapper` is pure (no I/O), so the golden cases in ``tests/cases/mqtt`` drive it
directly. A message yields an :class:`Outcome`: the records to commit, and at most one
quarantine entry naming what was wrong with it. Message-level problems (too large, not
UTF-8, not JSON, bad timestamp, undecodable Sparkplug) yield no records; a problem with
one point (missing path, wrong type) skips that point only and quarantines the message
with the reason, so the good points of the same message still flow.

Observation identity: a reading's id covers its point, its time and its content (see
:meth:`agent.records.Record.reading`). A message without a time of its own is observed
at its arrival, stamped by the mapper's :class:`~agent.records.ArrivalClock` (strictly
increasing microseconds), so two equal values never share a stamp.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

from agent.codes import translate
from agent.outbox import Cursor, Quarantined
from agent.rbe import RbeFilter, RbeUndo, ReportByException
from agent.records import ArrivalClock, EntityType, Record, SourceRef, format_observed
from agent.sources.mqtt import sparkplug
from agent.sources.mqtt.config import MqttConfig, PointConfig, SubscriptionConfig

log = structlog.get_logger("agent.sources.mqtt")

QUARANTINE_PAYLOAD_MAX = 4096
ALIAS_CURSOR_KEY = "sparkplug_aliases"
_MISSING = object()
# EntityType(value) is a slow enum call; a dict look-up per sample is not.
_ENTITY_TYPES: dict[str, EntityType] = {t.value: t for t in EntityType}


class BadInput(Exception):
    """Input that cannot be mapped; ``reason`` is a short snake_case counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class Outcome:
    """What one message produced."""

    records: list[Record] = field(default_factory=list)
    quarantine: Quarantined | None = None
    cursor: Cursor | None = None
    suppressed: int = 0
    skipped: int = 0


# ---------------------------------------------------------------------- helpers


def match_topic(pattern: list[str], topic: list[str]) -> dict[str, str] | None:
    """Match topic levels against filter levels (``+``, ``#``, ``{name}``); named values."""
    named: dict[str, str] = {}
    if topic and topic[0].startswith("$") and pattern and pattern[0] in {"+", "#"}:
        return None  # MQTT: wildcards at the first level never match $SYS-style topics
    for i, level in enumerate(pattern):
        if level == "#":
            return named
        if i >= len(topic):
            return None
        if level.startswith("{"):
            named[level[1:-1]] = topic[i]
        elif level != "+" and level != topic[i]:
            return None
    return named if len(topic) == len(pattern) else None


@functools.lru_cache(maxsize=4096)  # paths come from the config: a handful
def _pointer_tokens(path: str) -> tuple[str, ...]:
    if path.startswith("/"):
        return tuple(t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/"))
    return tuple(path.split("."))


def lookup(doc: Any, path: str) -> Any:
    """The value at a dotted path or JSON Pointer; ``_MISSING`` when absent."""
    tokens = _pointer_tokens(path)
    if len(tokens) == 1 and isinstance(doc, dict):  # the common case, every message
        return doc.get(tokens[0], _MISSING)
    node = doc
    for token in tokens:
        if isinstance(node, dict):
            if token not in node:
                return _MISSING
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return _MISSING
    return node


_TRUE = {"true", "on", "1", "yes"}
_FALSE = {"false", "off", "0", "no"}


_INT64 = (-(2**63), 2**64 - 1)  # what a record can carry (orjson: int64 and uint64)


def _number(value: Any) -> float | int:
    number: float | int
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadInput("wrong_type", f"expected a number, got {type(value).__name__}")
    if isinstance(value, str):
        try:
            number = float(value.strip()) if "." in value or "e" in value.lower() else int(value)
        except ValueError:
            raise BadInput("wrong_type", f"expected a number, got {value[:40]!r}") from None
    else:
        number = value
    if isinstance(number, float) and not math.isfinite(number):
        raise BadInput("wrong_type", "value is not a finite number")
    if isinstance(number, int) and not _INT64[0] <= number <= _INT64[1]:
        raise BadInput("wrong_type", f"integer {str(number)[:40]} is out of the 64-bit range")
    return number


def convert(value: Any, point: PointConfig) -> Any:
    """Type-convert and scale one raw value; raises BadInput(wrong_type)."""
    kind = point.type
    if value is None:
        raise BadInput("wrong_type", "value is null")
    if kind == "string":
        if isinstance(value, dict | list):
            raise BadInput("wrong_type", "expected text, got an object or array")
        return value if isinstance(value, str) else orjson.dumps(value).decode()
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise BadInput("wrong_type", f"expected a boolean, got {str(value)[:40]!r}")
    if kind == "auto" and (isinstance(value, bool | str) or value is None):
        return value
    if kind == "auto" and isinstance(value, dict | list):
        raise BadInput("wrong_type", "expected a scalar, got an object or array")
    number = _number(value)
    if kind == "int" and isinstance(number, float):
        if not number.is_integer():
            raise BadInput("wrong_type", f"expected an integer, got {number}")
        number = int(number)
    if point.scale != 1.0 or point.offset != 0.0:
        scaled = number * point.scale + point.offset
        if not math.isfinite(scaled):
            raise BadInput("wrong_type", f"{number} scaled by {point.scale} is not finite")
        return int(scaled) if kind == "int" and float(scaled).is_integer() else scaled
    return float(number) if kind == "float" else number


def parse_time(value: Any, fmt: str) -> datetime:
    """An observation time from epoch seconds/milliseconds or RFC 3339 text."""
    try:
        if isinstance(value, str) and fmt in {"auto", "rfc3339"}:
            at = datetime.fromisoformat(value.strip())
            return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
        if isinstance(value, int | float) and not isinstance(value, bool) and fmt != "rfc3339":
            millis = fmt == "ms" or (fmt == "auto" and value > 1e11)
            return datetime.fromtimestamp(value / 1000 if millis else value, UTC)
    except (ValueError, OverflowError, OSError):
        pass
    raise BadInput("bad_timestamp", f"cannot read a {fmt} timestamp from {str(value)[:40]!r}")


def _utf8(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput("invalid_utf8", f"payload is not UTF-8: {exc.reason}") from None


def _text(doc: Any, path: str | None) -> str | None:
    """A scalar at ``path`` as stripped text; None when absent, null, empty or not scalar."""
    if path is None:
        return None
    value = lookup(doc, path)
    if value is _MISSING or value is None or isinstance(value, dict | list):
        return None
    text = str(value).strip()
    return text or None


def _time_text(text: str | None) -> str | None:
    """RFC 3339 text normalized to UTC microseconds; other text kept as it is."""
    if text is None:
        return None
    try:
        return format_observed(parse_time(text, "rfc3339"))
    except BadInput:
        return text


_RESULTS = {
    "pass": "pass",
    "ok": "pass",
    "fail": "fail",
    "nok": "fail",
    "failed": "fail",
    "na": "na",
    "n/a": "na",
    "skipped": "na",
    "passed": "pass",
}


def _items(doc: dict[str, Any]) -> list[Any]:
    items = doc.get("items")
    if not isinstance(items, list) or not items:
        raise BadInput("missing_path", "inspection without 'items' (a non-empty array)")
    return items


def _check_item(i: int, item: Any) -> dict[str, Any]:
    """One checklist item, normalized: id, result (pass, fail, na), value, note."""
    if not isinstance(item, dict):
        raise BadInput("wrong_type", f"items.{i}: expected an object")
    item_id = _text(item, "id")
    raw = _text(item, "result")
    result = _RESULTS.get(raw.lower()) if raw else None
    if item_id is None or result is None:
        raise BadInput(
            "wrong_type", f"items.{i}: needs 'id' and 'result' (pass, fail, na), got {raw!r}"
        )
    return {
        "id": item_id,
        "text": _text(item, "text"),
        "result": result,
        "value": item.get("value"),
        "note": _text(item, "note"),
    }


def _preview(payload: bytes) -> bytes:
    return payload[:QUARANTINE_PAYLOAD_MAX]


# ---------------------------------------------------------------------- mapper


_CACHE_MAX = 10_000


@dataclass(slots=True)
class _Target:
    ref: SourceRef
    asset: str | None
    fields: dict[str, str]
    point_ids: dict[str, str]


@dataclass(slots=True)
class _Sample:
    point: PointConfig
    value: Any
    quality: str | None
    at: datetime
    stamped: int | None  # None: ``at`` is the source's time; else the arrival stamp's era


class Mapper:
    """Maps messages of one MQTT source to records, with per-point RBE state.

    ``rbe_undo``, when set (by the source, per batch), records what RBE learnt from the
    messages mapped, so that it can be rolled back if their records are not stored.
    """

    def __init__(self, ref: SourceRef, config: MqttConfig) -> None:
        self.ref = ref
        self.config = config
        self.subs = [(s, s.topic.split("/")) for s in config.subscriptions]
        self.rbe = RbeFilter()
        self.rbe_undo: RbeUndo | None = None
        self.clock = ArrivalClock()
        self.counters: Counter[str] = Counter()
        self.aliases: dict[str, dict[int, str]] = {}
        self.seq: dict[str, int] = {}
        self.sequence_gaps = 0
        self._targets: dict[str, _Target] = {}
        self._routes: dict[str, tuple[SubscriptionConfig, dict[str, str]] | None] = {}
        self.by_subscription: dict[str, list[int]] = {
            sub.topic: [0, 0] for sub in config.subscriptions
        }
        """Per subscription (its topic filter): ``[messages mapped, quarantined]``; the
        status page's per-subscription rate and bad inputs."""

    def map(self, topic: str, payload: bytes, received_at: datetime) -> Outcome:
        """Map one message; never raises for bad input (it is quarantined instead).

        ``received_at`` (timezone-aware) is when it arrived; messages are mapped in
        arrival order, and a time not later than the previous message's becomes 1 µs
        after it (see :class:`~agent.records.ArrivalClock`).
        """
        route = self.route(topic)
        if route is None:
            self.counters["unmatched_topic"] += 1
            return Outcome()
        sub, named = route
        received_at = self.clock.stamp(received_at)
        counts = self.by_subscription.setdefault(sub.topic, [0, 0])
        counts[0] += 1
        try:
            if len(payload) > self.config.max_payload_bytes:
                raise BadInput(
                    "payload_too_large",
                    f"{len(payload)} bytes > max_payload_bytes {self.config.max_payload_bytes}",
                )
            if sub.format == "sparkplug_b":
                outcome = self._sparkplug(sub, topic, named, payload, received_at)
            else:
                outcome = self._plain(sub, topic, named, payload, received_at)
        except BadInput as exc:
            outcome = Outcome(quarantine=self._bad(topic, payload, [(exc.reason, exc.detail)]))
        if outcome.quarantine is not None:
            counts[1] += 1
        return outcome

    def route(self, topic: str) -> tuple[SubscriptionConfig, dict[str, str]] | None:
        """The first subscription whose filter matches ``topic``, and its named levels."""
        if topic in self._routes:
            return self._routes[topic]
        levels = topic.split("/")
        found = None
        for sub, pattern in self.subs:
            named = match_topic(pattern, levels)
            if named is not None:
                found = (sub, named)
                break
        if len(self._routes) >= _CACHE_MAX:
            self._routes.clear()
        self._routes[topic] = found
        return found

    def bad_topic(self, topic: bytes, payload: bytes) -> Quarantined:
        """A message whose topic is not UTF-8 (MQTT requires it; a broker may not check)."""
        shown = topic.decode("utf-8", "replace")
        return self._bad(shown, payload, [("invalid_topic", "topic is not UTF-8")])

    def _bad(self, topic: str, payload: bytes, problems: list[tuple[str, str]]) -> Quarantined:
        for reason, _ in problems:
            self.counters[reason] += 1
        return Quarantined(
            source=self.ref.name,
            reason=problems[0][0],
            context={
                "topic": topic,
                "size": len(payload),
                "problems": [{"reason": r, "detail": d} for r, d in problems[:20]],
            },
            payload=_preview(payload),
        )

    # ------------------------------------------------------------------ json / value

    def _plain(
        self,
        sub: SubscriptionConfig,
        topic: str,
        named: dict[str, str],
        payload: bytes,
        received_at: datetime,
    ) -> Outcome:
        stamped: int | None = None
        if sub.format == "value":
            point = sub.points[0] if sub.points else PointConfig(name=topic.rsplit("/", 1)[-1])
            raw: Any = _utf8(payload).strip()
            at, stamped = received_at, self.clock.era
            samples: list[tuple[PointConfig, Any, str | None]] = [(point, raw, None)]
        else:
            try:
                doc = orjson.loads(payload)  # checks UTF-8 itself: no decoded copy
            except orjson.JSONDecodeError as exc:
                _utf8(payload)  # invalid UTF-8 is its own reason
                raise BadInput("invalid_json", f"payload is not JSON: {exc}") from None
            own = self._timestamp(sub, doc)
            at, stamped = (received_at, self.clock.era) if own is None else (own, None)
            if sub.format == "tag_scan":
                return self._tag_scan(sub, topic, named, doc, (at, stamped))
            if sub.format == "inspection":
                return self._inspection(sub, topic, named, doc, at)
            samples = [(p, lookup(doc, p.path or ""), self._quality(doc, p)) for p in sub.points]
        out = Outcome()
        problems: list[tuple[str, str]] = []
        good: list[_Sample] = []
        for point, raw, quality in samples:
            if raw is _MISSING:
                if point.optional:
                    out.skipped += 1
                    continue
                problems.append(("missing_path", f"point {point.name}: no value at {point.path}"))
                continue
            try:
                good.append(_Sample(point, convert(raw, point), quality, at, stamped))
            except BadInput as exc:
                problems.append((exc.reason, f"point {point.name}: {exc.detail}"))
        self._emit(sub, topic, named, good, out)
        if problems:
            out.quarantine = self._bad(topic, payload, problems)
        return out

    def _timestamp(self, sub: SubscriptionConfig, doc: Any) -> datetime | None:
        """The message's own time; None when it has none (it is observed on arrival)."""
        if sub.timestamp_path is None:
            return None
        raw = lookup(doc, sub.timestamp_path)
        if raw is _MISSING or raw is None:
            self.counters["timestamp_fallback"] += 1
            return None
        return parse_time(raw, sub.timestamp_format)

    @staticmethod
    def _quality(doc: Any, point: PointConfig) -> str | None:
        if point.quality_path is None:
            return None
        q = lookup(doc, point.quality_path)
        return None if q is _MISSING or q is None else str(q)

    # ------------------------------------------------------------------ records

    def _target(self, sub: SubscriptionConfig, topic: str, named: dict[str, str]) -> _Target:
        """Rendered templates of a topic (cached: topics repeat, templates cost)."""
        target = self._targets.get(topic)
        if target is not None:
            return target
        fields: dict[str, str] = {**named, "topic": topic, "source": self.ref.name}
        asset_tpl = sub.asset
        if asset_tpl is None and sub.format == "sparkplug_b":
            asset_tpl = "{edge_node}/{device}" if fields.get("device") else "{edge_node}"
        asset = asset_tpl.format_map(fields) if asset_tpl else named.get("asset")
        fields["asset"] = asset or ""
        site = sub.site.format_map(fields) if sub.site else self.ref.site
        ref = self.ref if site == self.ref.site else SourceRef(self.ref.name, self.ref.system, site)
        if len(self._targets) >= _CACHE_MAX:
            self._targets.clear()
        target = self._targets[topic] = _Target(ref, asset, fields, {})
        return target

    def _point_id(self, sub: SubscriptionConfig, target: _Target, point: str) -> str:
        pid = target.point_ids.get(point)
        if pid is None:
            if sub.point_id:
                pid = sub.point_id.format_map({**target.fields, "point": point})
            else:
                prefix = target.asset or target.fields["topic"]
                pid = f"{prefix}/{point}"
            target.point_ids[point] = pid
        return pid

    def _emit(
        self,
        sub: SubscriptionConfig,
        topic: str,
        named: dict[str, str],
        samples: list[_Sample],
        out: Outcome,
    ) -> None:
        target = self._target(sub, topic, named)
        ref, asset = target.ref, target.asset
        for s in samples:
            name = s.point.entity or sub.entity
            entity = _ENTITY_TYPES.get(name) or EntityType(name)
            point_id = self._point_id(sub, target, s.point.name)
            rbe: ReportByException | None = s.point.rbe or sub.rbe
            if rbe is not None and not self.rbe.check(
                point_id, s.value, s.at.timestamp(), rbe, s.quality, self.rbe_undo
            ):
                out.suppressed += 1
                continue
            data: dict[str, Any] = {"point": s.point.name, "asset_remote_id": asset}
            if entity is EntityType.EVENT and s.point.codes and s.value is not None:
                kind = "fault" if s.point.event_field == "code" else "state"
                coded = translate(s.value, s.point.codes, s.point.unknown_severity, kind)
                data[s.point.event_field] = coded.pop("code")
                data |= {"raw_code": s.value, **coded}
            elif entity is EntityType.EVENT:
                data[s.point.event_field] = s.value
            else:
                data["value"] = s.value
                data["unit"] = s.point.unit
            data["quality"] = s.quality
            data["topic"] = topic
            out.records.append(Record.reading(ref, entity, point_id, s.at, data, stamped=s.stamped))

    # ------------------------------------------------------------------ tag scans, inspections

    def _tag_scan(
        self,
        sub: SubscriptionConfig,
        topic: str,
        named: dict[str, str],
        doc: Any,
        when: tuple[datetime, int | None],
    ) -> Outcome:
        ts = sub.tag_scan
        assert ts is not None
        tag = _text(doc, ts.tag_path)
        if tag is None:
            raise BadInput("missing_path", f"no tag id at {ts.tag_path}")
        target = self._target(sub, topic, named)
        reader = _text(doc, ts.reader_path) or named.get("reader")
        asset = _text(doc, ts.asset_path) or ts.assets.get(tag) or target.asset
        if asset is None and ts.asset_from_tag:
            asset = tag
        fields = {**target.fields, "reader": reader or "", "asset": asset or ""}
        location = (
            _text(doc, ts.location_path)
            or (ts.locations.get(reader) if reader else None)
            or (sub.location.format_map(fields) if sub.location else None)
        )
        if asset is None:
            self.counters["tag_unresolved"] += 1
        rssi = lookup(doc, ts.rssi_path) if ts.rssi_path else _MISSING
        data: dict[str, Any] = {
            "point": "tag_scan",
            "event_type": "tag_scan",
            "tag_id": tag,
            "technology": _text(doc, ts.technology_path) or ts.technology,
            "reader": reader,
            "asset_remote_id": asset,
            "location_remote_id": location,
            "rssi": rssi if isinstance(rssi, int | float) and not isinstance(rssi, bool) else None,
            "topic": topic,
        }
        point_id = f"tag_scan/{reader or topic}/{tag}"
        at, stamped = when
        record = Record.reading(target.ref, EntityType.EVENT, point_id, at, data, stamped=stamped)
        return Outcome(records=[record])

    def _inspection(
        self, sub: SubscriptionConfig, topic: str, named: dict[str, str], doc: Any, at: datetime
    ) -> Outcome:
        if not isinstance(doc, dict):
            raise BadInput("wrong_type", "an inspection payload is a JSON object")
        remote_id = _text(doc, "id")
        if remote_id is None:
            raise BadInput("missing_path", "inspection without 'id'")
        items = [_check_item(i, item) for i, item in enumerate(_items(doc))]
        target = self._target(sub, topic, named)
        asset = _text(doc, "asset") or target.asset
        fields = {**target.fields, "asset": asset or ""}
        failed = sum(1 for item in items if item["result"] == "fail")
        result = _text(doc, "result") or ("fail" if failed else "pass")
        data: dict[str, Any] = {
            "asset_remote_id": asset,
            "location_remote_id": _text(doc, "location")
            or (sub.location.format_map(fields) if sub.location else None),
            "checklist": _text(doc, "checklist"),
            "inspector": _text(doc, "inspector"),
            "started_at": _time_text(_text(doc, "started_at")),
            "completed_at": format_observed(at),
            "result": result.lower(),
            "items": items,
            "failed_items": failed,
        }
        record = Record.entity(
            target.ref,
            EntityType.INSPECTION,
            remote_id,
            data,
            source_modified_at=at,
            observed_at=at,
        )
        return Outcome(records=[record])

    # ------------------------------------------------------------------ sparkplug

    def _sparkplug(
        self,
        sub: SubscriptionConfig,
        topic: str,
        named: dict[str, str],
        payload: bytes,
        received_at: datetime,
    ) -> Outcome:
        spt = sparkplug.parse_topic(topic)
        if spt is None:
            raise BadInput("sparkplug_bad_topic", "not a spBv1.0/<group>/<type>/<node> topic")
        named = {
            **named,
            "group": spt.group,
            "message_type": spt.message_type,
            "edge_node": spt.edge_node,
            "device": spt.device or "",
        }
        if spt.message_type in {"NCMD", "DCMD", "STATE"}:
            self.counters["sparkplug_ignored"] += 1
            return Outcome()
        try:
            decoded = sparkplug.decode(payload)
        except sparkplug.SparkplugError as exc:
            raise BadInput("sparkplug_decode_error", str(exc)) from None
        node = f"{spt.group}/{spt.edge_node}"
        self._check_seq(node, spt.message_type, decoded.seq)
        key = f"{node}/{spt.device or ''}"
        out = Outcome()
        if spt.message_type.endswith("DEATH"):
            self.counters["sparkplug_death"] += 1
            return out
        if spt.message_type.endswith("BIRTH"):
            table = {m.alias: m.name for m in decoded.metrics if m.alias is not None and m.name}
            self.aliases[key] = table
            if spt.message_type == "NBIRTH":  # a node rebirth invalidates its devices' tables
                for k in [k for k in self.aliases if k.startswith(node + "/") and k != key]:
                    del self.aliases[k]
            out.cursor = Cursor(self.ref.name, ALIAS_CURSOR_KEY, self.alias_state())
        self._metrics(
            sub, topic, named, key, decoded, received_at=received_at, payload=payload, out=out
        )
        return out

    def _check_seq(self, node: str, message_type: str, seq: int | None) -> None:
        if seq is None:
            return
        last = self.seq.get(node)
        if message_type != "NBIRTH" and last is not None and seq != (last + 1) % 256:
            self.sequence_gaps += 1
            self.counters["sparkplug_sequence_gap"] += 1
            log.warning(
                "mqtt_sparkplug_sequence_gap",
                source=self.ref.name,
                node=node,
                expected=(last + 1) % 256,
                got=seq,
            )
        self.seq[node] = seq

    def _metrics(
        self,
        sub: SubscriptionConfig,
        topic: str,
        named: dict[str, str],
        key: str,
        decoded: sparkplug.Payload,
        *,
        received_at: datetime,
        payload: bytes,
        out: Outcome,
    ) -> None:
        wanted = {p.name: p for p in sub.points}
        table = self.aliases.get(key, {})
        good: list[_Sample] = []
        problems: list[tuple[str, str]] = []
        for m in decoded.metrics:
            name = m.name or (table.get(m.alias) if m.alias is not None else None)
            if name is None:
                problems.append(("sparkplug_unknown_alias", f"alias {m.alias} not in a BIRTH"))
                continue
            point = wanted.get(name) if wanted else PointConfig(name=name)
            if point is None or name.startswith("bdSeq"):
                out.skipped += 1
                continue
            ms = m.timestamp if m.timestamp is not None else decoded.timestamp
            if ms is not None:
                at, stamped = datetime.fromtimestamp(ms / 1000, UTC), None
            else:
                at, stamped = received_at, self.clock.era
            if m.is_null:
                good.append(_Sample(point, None, "bad", at, stamped))
                continue
            try:
                good.append(_Sample(point, convert(m.value, point), "good", at, stamped))
            except BadInput as exc:
                problems.append((exc.reason, f"metric {name}: {exc.detail}"))
        self._emit(sub, topic, named, good, out)
        if problems:
            out.quarantine = self._bad(topic, payload, problems)

    def alias_state(self) -> dict[str, dict[str, str]]:
        """The alias tables as a JSON-ready cursor value (restored at start-up)."""
        return {k: {str(a): n for a, n in t.items()} for k, t in self.aliases.items()}

    def restore_aliases(self, state: Any) -> None:
        """Load alias tables committed by an earlier run."""
        if isinstance(state, dict):
            self.aliases = {
                k: {int(a): str(n) for a, n in t.items()}
                for k, t in state.items()
                if isinstance(t, dict)
            }
