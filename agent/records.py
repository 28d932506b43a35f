"""The unified maintenance record envelope (model v1).

Every source turns its input into :class:`Record` objects; the outbox stores them and the
forwarder sends them upstream unchanged (plus the outbox ``seq``). The identifiers are
deterministic, so re-reading an unchanged row or a broker redelivering a message yields
the same ``id`` and the upstream can drop what it has already seen:

* ``entity_id = uuid5(NS, f"{source}:{entity_type}:{remote_id}")``
* ``id = uuid5(NS, f"{entity_id}:{content_hash}:{prev}")`` for entity versions, where
  ``prev`` is the id of the entity's previous version in the same outbox, or the
  outbox's epoch for its first one (see :func:`chain_id`). Only the outbox knows
  ``prev``, so :meth:`Record.entity` gives a version a provisional id,
  ``uuid5(NS, f"{entity_id}:{content_hash}")``, and the outbox writes the chained one
  into the stored envelope (``AppendResult.ids`` tells the caller). A version equal to
  the entity's last one is not appended at all, so a re-read changes nothing upstream;
  one that returns to an earlier content (A, B, A) gets a new id, never an old one.
* ``id = uuid5(NS, f"{source}:{point}:{observed_at}:{content_hash}")`` for readings and
  events (``{observed_at}~{era}`` when the agent stamped the time): one id per
  observation (the point, its observed time at microseconds, what was observed), so two
  values of one point in one second never share an id.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal

import orjson

# The namespace of every edge-agent uuid5. Changing it changes every id: never do that.
NS = uuid.UUID("6f1c8a52-3d0e-5b7a-9c41-2e8f5d6a7b30")

MODEL_VERSION = 1
_NS_BYTES = NS.bytes

# The optional C builder (agent/_envelope.c, compiled at install when a C compiler and
# OpenSSL's headers are there). splice_python below is the reference; the tests hold the
# two to the same bytes. EDGE_AGENT_PURE_PYTHON=1 turns the C builder off.
_ENVELOPE_ABI = 4  # what agent._envelope's functions take and return (its ABI constant)
_envelope: Any
try:
    from agent import _envelope
except ImportError:  # not compiled: the pure-Python builder does the same, slower
    _envelope = None
if getattr(_envelope, "ABI", None) != _ENVELOPE_ABI:  # a stale build: not trusted
    _envelope = None
if os.environ.get("EDGE_AGENT_PURE_PYTHON", "").strip() not in {"", "0"}:
    _envelope = None


class EntityType(StrEnum):
    """Entity types of the unified maintenance model v1."""

    ASSET = "asset"
    LOCATION = "location"
    WORK_ORDER = "work_order"
    MAINTENANCE_REQUEST = "maintenance_request"
    METER_READING = "meter_reading"
    EVENT = "event"
    INSPECTION = "inspection"
    PART = "part"
    INVENTORY_LEVEL = "inventory_level"
    PURCHASE_ORDER = "purchase_order"
    CONNECTION_STATUS = "connection_status"


class Op(StrEnum):
    """What a record does to its entity upstream."""

    UPSERT = "upsert"
    DELETE = "delete"


class RetentionClass(StrEnum):
    """How the outbox may treat a record when it is over budget.

    ``business`` records are never dropped; ``reading`` records (meter readings and
    events) may be dropped oldest-first when the configuration allows it.
    """

    BUSINESS = "business"
    READING = "reading"


READING_TYPES = frozenset({EntityType.METER_READING, EntityType.EVENT})

Precision = Literal["second", "minute", "day", "none"]


def retention_class(entity_type: EntityType) -> RetentionClass:
    """Return the retention class of an entity type."""
    return RetentionClass.READING if entity_type in READING_TYPES else RetentionClass.BUSINESS


_ADDRESSES = (
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
    ipaddress.IPv4Interface,
    ipaddress.IPv6Interface,
)


def iso_duration(value: timedelta) -> str:
    """``value`` as an ISO 8601 duration: ``P1DT2H3M4.5S``, ``-PT30S``, ``PT0S``."""
    micros = (value.days * 86400 + value.seconds) * 1_000_000 + value.microseconds
    sign, micros = ("-", -micros) if micros < 0 else ("", micros)
    days, rest = divmod(micros, 86_400_000_000)
    hours, rest = divmod(rest, 3_600_000_000)
    minutes, rest = divmod(rest, 60_000_000)
    seconds, frac = divmod(rest, 1_000_000)
    time = "".join(f"{n}{unit}" for n, unit in ((hours, "H"), (minutes, "M")) if n) + (
        f"{seconds}.{frac:06d}".rstrip("0") + "S" if frac else f"{seconds}S" if seconds else ""
    )
    if not days and not time:
        return "PT0S"
    return f"{sign}P{f'{days}D' if days else ''}{f'T{time}' if time else ''}"


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        # Exact decimal text: SAP quantities and amounts must not pick up float noise.
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, timedelta):
        # A database interval (PostgreSQL ``interval``, MySQL ``TIME`` as a duration).
        return iso_duration(value)
    if isinstance(value, _ADDRESSES):
        return str(value)  # PostgreSQL inet/cidr
    raise TypeError(f"value of type {type(value).__name__} is not JSON serializable")


_CANON = orjson.OPT_SORT_KEYS | orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC


def canonical_json(value: Any) -> bytes:
    """Encode ``value`` canonically: sorted keys, no whitespace, UTF-8, times in UTC ``Z``.

    Two equal values always give the same bytes, which is what makes ``content_hash``
    and therefore record ids deterministic.
    """
    return orjson.dumps(value, default=_default, option=_CANON)


# The last time formatted, and its text: a sync or a batch of messages stamps every
# record with the same ``observed_at`` object. (Identity, not equality: a tuple swap is
# atomic, and the object cannot be freed and its id reused while the tuple holds it.)
_last_time: tuple[object, str] = (object(), "")


def _to_utc(value: datetime) -> datetime:
    """``value`` in UTC (tzinfo ``UTC``); a naive value is taken as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def format_time(value: datetime) -> str:
    """Format a datetime as RFC 3339 UTC with milliseconds (naive values are taken as UTC)."""
    global _last_time  # noqa: PLW0603 - a one-entry cache
    last = _last_time
    if last[0] is value:
        return last[1]
    given = value
    if value.tzinfo is not UTC:
        value = _to_utc(value)
    if value.year >= 1000:  # isoformat is ~5x faster than strftime; same text for 4-digit years
        text = iso_utc(value)
    else:
        text = value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    _last_time = (given, text)
    return text


def iso_utc(value: datetime) -> str:
    """``value`` (UTC, tzinfo ``UTC``) as ``YYYY-MM-DDTHH:MM:SS.mmmZ``, milliseconds truncated.

    The same text as ``isoformat(timespec="milliseconds")``, which costs twice as much
    as the plain ``isoformat()`` sliced here (hot path: every reading).
    """
    text = value.isoformat()  # YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00
    return text[:23] + "Z" if value.microsecond else text[:19] + ".000Z"


def format_observed(value: datetime) -> str:
    """An observation time as RFC 3339 UTC with microseconds: ``YYYY-MM-DDTHH:MM:SS.ffffffZ``.

    Readings and events show, and their ids hash, the observed time to the microsecond:
    an arrival stamp has that resolution, and milliseconds would show two observations
    of one point with one time. Always six digits and a four-digit year (naive values
    are taken as UTC), so the text sorts as the time does and has one length.
    """
    if value.tzinfo is not UTC:
        value = _to_utc(value)
    if value.year >= 1000:  # isoformat: YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00
        text = value.isoformat()
        return text[:26] + "Z" if value.microsecond else text[:19] + ".000000Z"
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:"
        f"{value.minute:02d}:{value.second:02d}.{value.microsecond:06d}Z"
    )


_ONE_US = timedelta(microseconds=1)
CLOCK_STEP_BACK = timedelta(seconds=1)
"""How far back the clock may go before :class:`ArrivalClock` follows it (see there)."""


class ArrivalClock:
    """Arrival stamps of one producer: UTC, microseconds, strictly increasing per era.

    An observation without a time of its own is stamped on arrival, and the stamp is
    part of its id; two messages of one point with one value must not get one stamp,
    however close together they arrive (a backlog is delivered in bursts). A stamp not
    later than the previous one becomes the previous one plus a microsecond. When the
    system clock steps back by more than :data:`CLOCK_STEP_BACK` (NTP correcting a bad
    clock), the stamps follow the clock instead of running ahead of it for as long as
    the step, and ``era`` counts up: the era is part of a stamped observation's id
    (``Record.reading(stamped=era)``), so the microseconds lived twice never collide.
    """

    __slots__ = ("_last", "era")

    def __init__(self) -> None:
        self._last: datetime | None = None
        self.era = 0

    def stamp(self, at: datetime | None = None) -> datetime:
        """``at`` (timezone-aware; default: now), moved past the previous stamp if needed."""
        if at is None:
            at = datetime.now(UTC)
        last = self._last
        if last is not None and at <= last:
            if last - at < CLOCK_STEP_BACK:
                at = last + _ONE_US
            else:
                self.era += 1
        self._last = at
        return at


STATUS_CLOCK = ArrivalClock()
"""The stamps of ``connection_status`` changes (upstream, SQL and Modbus devices)."""


# uuid5 = sha1(namespace bytes + name): hash the namespace once and copy the state.
_NS_SHA1 = hashlib.sha1(_NS_BYTES, usedforsecurity=False)
_sha1 = hashlib.sha1
# The RFC 4122 variant bits replace the top two bits of hex digit 16.
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def _uuid5(name: str) -> str:
    """``str(uuid.uuid5(NS, name))`` without building UUID objects (hot path: every record)."""
    sha = _NS_SHA1.copy()
    sha.update(name.encode())
    return _uuid5_text(sha.hexdigest())


def _uuid5_text(h: str) -> str:
    """The uuid5 text of a SHA-1 hex digest: version 5, RFC 4122 variant."""
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


def chain_id(entity_id: str, content_hash: str, prev: str) -> str:
    """The id of an entity version: ``uuid5(NS, f"{entity_id}:{content_hash}:{prev}")``.

    ``prev`` is the id of the entity's previous version appended to the same outbox, or
    that outbox's epoch for its first version. An id names one transition, not one
    content: A, B, A gives three ids, and a fresh outbox (a new epoch) never repeats one.
    """
    return _uuid5(f"{entity_id}:{content_hash}:{prev}")


def _time_or_none(value: datetime | date | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return format_time(value)
    return value.isoformat()


@functools.lru_cache(maxsize=65536)
def entity_uuid(source: str, entity_type: str, remote_id: str) -> uuid.UUID:
    """The stable id of an entity: one per (source, entity type, remote id).

    Cached: readings hit the same few thousand points over and over.
    """
    return uuid.uuid5(NS, f"{source}:{entity_type}:{remote_id}")


@functools.lru_cache(maxsize=65536)
def _entity_id(source: str, entity_type: str, remote_id: str) -> str:
    """``str(entity_uuid(...))``, cached as text (readings: the same points again and again)."""
    return _uuid5(f"{source}:{entity_type}:{remote_id}")


_EMPTY_OBJECT = b"{}"
_NULL = b"null"
_OP_JSON: dict[str, bytes] = {op: orjson.dumps(op.value) for op in Op}


def _hash(op_json: bytes, data: bytes, custom: bytes, remote_data: bytes) -> str:
    """``content_hash`` from the canonical JSON of its parts.

    The same bytes as ``canonical_json({"op", "data", "custom", "remote_data"})``: sorted
    keys, no whitespace, each part in its own canonical form. Building it from the parts
    lets a record encode ``data`` once for both its hash and its envelope.
    """
    body = b"".join(
        (b'{"custom":', custom, b',"data":', data, b',"op":', op_json, b',"remote_data":',
         remote_data, b"}")
    )  # fmt: skip
    return "sha256:" + hashlib.sha256(body).hexdigest()


def content_hash(
    op: str, data: dict[str, Any], custom: dict[str, Any], remote_data: dict[str, Any] | None
) -> str:
    """``sha256:<hex>`` over the canonical JSON of what the upstream sees of a version."""
    encode = canonical_json
    return _hash(encode(op), encode(data), encode(custom), encode(remote_data))


def content_digests(versions: Sequence[tuple[Any, ...]]) -> list[int]:
    """Per ``(data, op, modified, custom, remote_data)`` (a mapped row), the first 60 bits
    of its :func:`content_hash` digest as an integer: what a key set keeps per key
    (:func:`agent.outbox_keys.digest_of` of the hash text), without the hex text in
    between. Reconciliation computes it for every row it compares, so the loop is here,
    its lookups hoisted."""
    dumps, option, default, ops, sha256 = orjson.dumps, _CANON, _default, _OP_JSON, hashlib.sha256
    from_bytes, join = int.from_bytes, b"".join
    out: list[int] = []
    append = out.append
    for data, op, _, custom, remote in versions:
        body = join(
            (b'{"custom":', dumps(custom, default=default, option=option) if custom else
             _EMPTY_OBJECT, b',"data":', dumps(data, default=default, option=option),
             b',"op":', ops.get(op) or dumps(op, option=option), b',"remote_data":',
             _NULL if remote is None else dumps(remote, default=default, option=option), b"}")
        )  # fmt: skip
        append(from_bytes(sha256(body).digest()[:8], "big") >> 4)
    return out


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where a record comes from: the configured source name, its system and site."""

    name: str
    system: str
    site: str | None = None
    _json: bytes = field(init=False, repr=False, compare=False)
    """:meth:`as_dict` as canonical JSON, encoded once (every record carries it)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_json", canonical_json(self.as_dict()))

    def as_dict(self) -> dict[str, Any]:
        """The ``source`` object of the envelope."""
        return {"name": self.name, "system": self.system, "site": self.site}


_TYPE_JSON: dict[str, bytes] = {t: orjson.dumps(t.value) for t in EntityType}
_PRECISION_JSON: dict[str, bytes] = {
    p: orjson.dumps(p) for p in ("second", "minute", "day", "none")
}


_READING_TAIL = b',"modified_precision":"second","observed_at":'
_UPSERT_JSON = b',"op":"upsert"'


def _reading_json(  # noqa: PLR0917 - positional: the hot path of every reading
    rid: str,
    eid: str,
    entity_type: EntityType,
    source: SourceRef,
    point: str,
    at: str,
    chash: str,
    parts: tuple[bytes, bytes, bytes | None],
) -> bytes:
    """``canonical_json(envelope())`` of a reading, spliced from its parts (hot path).

    ``rid``, ``eid`` and ``chash`` are hex digits and dashes, ``at`` digits and
    punctuation (nothing to escape); ``parts`` is the canonical JSON of data, custom and
    remote_data, shared with the content hash. Keys come in sorted order, as
    ``OPT_SORT_KEYS`` writes them; every other string goes through orjson. The golden
    tests compare this with ``canonical_json``.
    """
    data, custom, remote_data = parts
    at_json = b'"' + at.encode() + b'"'
    return b"".join(
        (
            b'{"content_hash":"', chash.encode(),
            b'","custom":', custom,
            b',"data":', data,
            b',"entity_id":"', eid.encode(),
            b'","entity_type":', _TYPE_JSON.get(entity_type) or orjson.dumps(str(entity_type)),
            b',"id":"', rid.encode(), b'"',
            _READING_TAIL, at_json,
            _UPSERT_JSON,
            b"" if remote_data is None else b',"remote_data":', remote_data or b"",
            b',"remote_id":', orjson.dumps(point),
            b',"source":', source._json,
            b',"source_modified_at":', at_json,
            b"}",
        )
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Record:
    """One change in the unified model, as the upstream receives it (without ``seq``).

    Build records with :meth:`entity` or :meth:`reading`, which compute the hash and the
    deterministic ids; the constructor takes the fields as they are. The ``id`` of an
    entity version is provisional: the outbox stores it under its chained id (see the
    module docstring), which ``Outbox.append`` returns in ``AppendResult.ids``. A record is
    immutable, its dicts included: :meth:`entity` and :meth:`reading` encode the
    envelope once, when the content hash needs the encoded ``data`` anyway, and
    :meth:`to_json` returns those bytes.
    """

    id: str
    entity_id: str
    entity_type: EntityType
    op: Op
    source: SourceRef
    remote_id: str
    observed_at: str
    content_hash: str
    data: dict[str, Any]
    custom: dict[str, Any] = field(default_factory=dict)
    remote_data: dict[str, Any] | None = None
    source_modified_at: str | None = None
    modified_precision: Precision = "second"
    _json: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _id_at: int = field(default=-1, init=False, repr=False, compare=False)
    """Where ``id`` starts in ``_json`` (entity versions made by :class:`EntityBuilder`;
    -1 otherwise): the outbox writes the chained id there without re-encoding."""

    @classmethod
    def entity(
        cls,
        source: SourceRef,
        entity_type: EntityType,
        remote_id: str,
        data: dict[str, Any],
        *,
        op: Op = Op.UPSERT,
        custom: dict[str, Any] | None = None,
        remote_data: dict[str, Any] | None = None,
        source_modified_at: datetime | date | str | None = None,
        modified_precision: Precision = "second",
        observed_at: datetime | str | None = None,
    ) -> Record:
        """A version of a business entity, with its provisional ``id`` (content only).

        ``observed_at`` may be given as text already formatted by :func:`format_time`
        (a sync stamps a whole chunk with one time).
        """
        if observed_at is None:
            observed_at = datetime.now(UTC)
        observed = observed_at if isinstance(observed_at, str) else format_time(observed_at)
        return entity_builder(source, entity_type, modified_precision).build(
            remote_id, data, op, custom or {}, remote_data, _time_or_none(source_modified_at),
            observed,
        )  # fmt: skip

    @classmethod
    def reading(
        cls,
        source: SourceRef,
        entity_type: EntityType,
        point: str,
        observed_at: datetime,
        data: dict[str, Any],
        *,
        custom: dict[str, Any] | None = None,
        remote_data: dict[str, Any] | None = None,
        stamped: int | None = None,
    ) -> Record:
        """A meter reading or event of ``point``: one observation.

        Its ``id`` covers the source, the point, ``observed_at`` (to the microsecond),
        where that time comes from, and the content hash (the value, or the event's
        fields): a broker redelivering the same message gives the same id, so the
        upstream keeps one copy, and two different observations never share one,
        whatever their times. ``stamped`` is None when ``observed_at`` is the source's
        time, else the :class:`ArrivalClock` era of the agent's stamp (a stamp and a
        source time that happen to be equal are still two observations).
        """
        if entity_type not in READING_TYPES:
            raise ValueError(f"reading() is for meter_reading and event, not {entity_type}")
        custom = custom or {}
        d = canonical_json(data)
        c = canonical_json(custom) if custom else _EMPTY_OBJECT
        r = None if remote_data is None else canonical_json(remote_data)
        at = format_observed(observed_at)
        chash = _hash(_OP_JSON[Op.UPSERT], d, c, _NULL if r is None else r)
        # Source names have no ':' and the time and hash have fixed lengths: one name
        # per (source, point, time, origin of the time, content).
        rid = _uuid5(
            f"{source.name}:{point}:{at}:{chash}"
            if stamped is None
            else f"{source.name}:{point}:{at}~{stamped}:{chash}"
        )
        eid = _entity_id(source.name, entity_type, point)
        body = _reading_json(rid, eid, entity_type, source, point, at, chash, (d, c, r))
        return _new_record(
            rid, eid, entity_type, Op.UPSERT, source, point, at, chash,
            data, custom, remote_data, at, "second", body, -1,
        )  # fmt: skip

    @property
    def retention(self) -> RetentionClass:
        """The record's retention class."""
        return retention_class(self.entity_type)

    def envelope(self, seq: int | None = None) -> dict[str, Any]:
        """The JSON envelope of DESIGN.md (``seq`` included when known)."""
        env: dict[str, Any] = {
            "id": self.id,
            "entity_id": self.entity_id,
            "entity_type": str(self.entity_type),
            "op": str(self.op),
            "source": self.source.as_dict(),
            "remote_id": self.remote_id,
            "source_modified_at": self.source_modified_at,
            "modified_precision": self.modified_precision,
            "observed_at": self.observed_at,
            "content_hash": self.content_hash,
            "data": self.data,
            "custom": self.custom,
        }
        if self.remote_data is not None:
            env["remote_data"] = self.remote_data
        if seq is not None:
            env["seq"] = seq
        return env

    def to_json(self) -> bytes:
        """The envelope (without ``seq``) as canonical JSON bytes, as the outbox stores it."""
        if self._json is not None:
            return self._json
        return canonical_json(self.envelope())


# The record constructor without the frozen dataclass's per-field object.__setattr__
# (half the cost of building a record). Generated from the fields, as dataclasses
# generates __init__, so it cannot miss one.
def _record_constructor() -> Callable[..., Record]:
    names = [f.name for f in fields(Record)]
    scope: dict[str, Any] = {"_new": object.__new__, "_Record": Record}
    scope.update({f"_set_{n}": getattr(Record, n).__set__ for n in names})
    body = "".join(f"\n    _set_{n}(rec, {n})" for n in names)
    exec(f"def new({', '.join(names)}):\n    rec = _new(_Record){body}\n    return rec", scope)  # noqa: S102
    return scope["new"]  # type: ignore[no-any-return]


_new_record = _record_constructor()


class EntityBuilder:
    """Builds the entity versions of one source, entity type and precision.

    What all of them share (the entity-name prefix hashed into ``entity_id``, the
    constant parts of the envelope) is encoded once; a SQL sync builds a whole chunk
    with one builder. :meth:`Record.entity` goes through here too, so both give the
    same bytes (the golden tests hold them to it).
    """

    __slots__ = (
        "_id_base", "_mid", "_mod", "_obs", "_precision", "_prefix", "_src", "entity_type",
        "precision", "source",
    )  # fmt: skip

    def __init__(self, source: SourceRef, entity_type: EntityType, precision: Precision) -> None:
        with contextlib.suppress(ValueError):  # "work_order" and the member share a cache entry
            entity_type = EntityType(entity_type)
        self.source, self.entity_type, self.precision = source, entity_type, precision
        dumps = orjson.dumps
        self._prefix = f"{source.name}:{entity_type}:".encode()
        self._mid = b'","entity_type":' + (
            _TYPE_JSON.get(entity_type) or dumps(str(entity_type))
        ) + b',"id":"'  # fmt: skip
        # The id's offset in the envelope, less the lengths of custom and data: the
        # parts before it are '{"content_hash":"' hash '","custom":' custom ',"data":'
        # data ',"entity_id":"' entity_id, then _mid (see splice_python).
        self._id_base = 17 + 71 + 11 + 8 + 14 + 36 + len(self._mid)
        self._precision = b'","modified_precision":' + (
            _PRECISION_JSON.get(precision) or dumps(precision)
        ) + b',"observed_at":'  # fmt: skip
        self._src = b',"source":' + source._json + b',"source_modified_at":'
        # observed_at and source_modified_at with their JSON, for the last value seen (a
        # chunk shares one observed time, and runs of rows one modified time). A tuple
        # swap is atomic: builders are shared between threads.
        self._obs: tuple[str | None, bytes] = (None, b"null")
        self._mod: tuple[str | None, bytes] = (None, b"null")

    def build(  # noqa: PLR0917 - positional: the hot path of every SQL row
        self,
        remote_id: str,
        data: dict[str, Any],
        op: Op,
        custom: dict[str, Any],
        remote_data: dict[str, Any] | None,
        modified: str | None,
        observed: str,
    ) -> Record:
        """One version; times already formatted by :func:`format_time`.

        orjson encodes the values; :data:`_splice` (C or Python) hashes and splices.
        """
        dumps = orjson.dumps
        d = dumps(data, default=_default, option=_CANON)
        c = dumps(custom, default=_default, option=_CANON) if custom else _EMPTY_OBJECT
        r = None if remote_data is None else dumps(remote_data, default=_default, option=_CANON)
        name = remote_id.encode()
        obs = self._obs
        if obs[0] is not observed:
            obs = self._obs = (observed, dumps(observed))
        mod = self._mod
        if mod[0] is not modified:
            mod = self._mod = (modified, dumps(modified))
        eid, chash, rid, body = _splice(
            _NS_BYTES, self._prefix, name, dumps(remote_id),
            _OP_JSON.get(op) or canonical_json(op), d, c, r,
            self._mid, self._precision, obs[1], self._src, mod[1],
        )  # fmt: skip
        return _new_record(
            rid, eid, self.entity_type, op, self.source, remote_id, observed, chash,
            data, custom, remote_data, modified, self.precision, body,
            self._id_base + len(c) + len(d),
        )  # fmt: skip


def splice_python(  # noqa: PLR0917 - the signature of agent._envelope.build
    ns: bytes,
    prefix: bytes,
    name: bytes,
    remote_id_json: bytes,
    op_json: bytes,
    d: bytes,
    c: bytes,
    r: bytes | None,
    mid: bytes,
    precision: bytes,
    obs_json: bytes,
    src: bytes,
    mod_json: bytes,
) -> tuple[str, str, str, bytes]:
    """``(entity_id, content_hash, id, envelope JSON)`` of an entity version (the reference).

    ``agent._envelope.build`` (C) computes the same from the same arguments; the tests
    hold the two to the same bytes.
    """
    eid = _uuid5_text(_sha1(ns + prefix + name).hexdigest())
    chash = _hash(op_json, d, c, _NULL if r is None else r)
    rid = _uuid5_text(_sha1(ns + f"{eid}:{chash}".encode()).hexdigest())
    body = b"".join(
        (
            b'{"content_hash":"', chash.encode(),
            b'","custom":', c,
            b',"data":', d,
            b',"entity_id":"', eid.encode(), mid, rid.encode(), precision,
            obs_json,
            b',"op":', op_json,
            b"" if r is None else b',"remote_data":', r or b"",
            b',"remote_id":', remote_id_json,
            src, mod_json,
            b"}",
        )
    )  # fmt: skip
    return eid, chash, rid, body


def chain_python(  # noqa: PLR0917 - positional, as link() calls it per version
    ns: bytes,
    entity_id: str,
    content_hash: str,
    prev: str,
    body: bytes,
    at: int,
    provisional: str,
) -> str | None:
    """The chained id, once the 36 bytes of ``body`` at ``at`` are ``provisional``.

    Part of :func:`link_python` (``chain_text`` in agent/_envelope.c). None when they
    are not, which :func:`chainable` rules out.
    """
    if len(provisional) != 36 or at < 0 or body[at : at + 36] != provisional.encode():
        return None
    return _uuid5_text(_sha1(ns + f"{entity_id}:{content_hash}:{prev}".encode()).hexdigest())


def link_python(  # noqa: PLR0917 - the signature of agent._envelope.link
    ns: bytes,
    epoch: str,
    rows: list[tuple[Any, ...]],
    versions: list[tuple[str, str, str] | None],
    known: dict[str, tuple[str, str | None]],
    latest: dict[str, tuple[str, str]],
) -> tuple[list[tuple[Any, ...]], list[str | None], int]:
    """The outbox writer's loop over one append: ``(rows kept, ids, unchanged)``.

    The reference of ``agent._envelope.link``. ``rows`` are the outbox's rows (id first,
    the envelope and the id's offset in it last, see :func:`chainable`); ``versions`` says
    per row ``(entity, digest, content_hash)``, or None for a reading, which is kept as it
    is. ``known`` and ``latest`` map an entity to ``(digest, last id)`` (the id None for
    an entity last appended by a v2 agent), ``latest`` first, and ``latest`` is updated.
    A version whose digest is its entity's last one is dropped (its id: None); the others
    get the id chained from the entity's last id, or from ``epoch``.
    """
    keep: list[tuple[Any, ...]] = []
    ids: list[str | None] = []
    unchanged = 0
    for row, version in zip(rows, versions, strict=True):
        if version is None:
            keep.append(row)
            ids.append(row[0])
            continue
        entity, digest, chash = version
        last: tuple[str, str | None] | None = latest.get(entity) or known.get(entity)
        if last is not None and last[0] == digest:
            unchanged += 1
            ids.append(None)
            continue
        prev = epoch if last is None or last[1] is None else last[1]
        rid = chain_python(ns, row[1], chash, prev, row[6], row[7], row[0])
        if rid is None:  # chainable() rules it out: never write over other bytes
            raise ValueError(f"envelope of {entity!r} has no provisional id where the builder said")
        keep.append((rid, *row[1:]))
        ids.append(rid)
        latest[entity] = (digest, rid)
    return keep, ids, unchanged


# What EntityBuilder.build hashes and splices with, and what the outbox chains with: C when
# compiled, else the references.
_splice: Callable[..., tuple[str, str, str, bytes]] = (
    splice_python if _envelope is None else _envelope.build
)
_link: Callable[..., tuple[list[tuple[Any, ...]], list[str | None], int]] = (
    link_python if _envelope is None else _envelope.link
)


def chainable(record: Record) -> tuple[str, bytes, int]:
    """``(provisional id, envelope, at)`` of an entity version, ready for the outbox.

    ``at`` is where the 36 bytes of the provisional id sit in ``envelope``: the outbox's
    writer computes the chained id (:data:`_link`, which checks that those bytes are the
    provisional id) and writes it there, with no re-encoding. A record from
    :class:`EntityBuilder` has both already; any other record (built field by field) is
    encoded here with a random placeholder id, which cannot occur anywhere else in its
    envelope.
    """
    body, at = record._json, record._id_at
    if body is not None and at >= 0 and body[at : at + 36] == record.id.encode():
        return record.id, body, at
    placeholder = str(uuid.uuid4())
    body = canonical_json({**record.envelope(), "id": placeholder})
    return placeholder, body, body.index(placeholder.encode())


def builder_implementation() -> str:
    """``"c"`` when entity versions are built by ``agent._envelope``, else ``"python"``."""
    return "python" if _splice is splice_python else "c"


@functools.lru_cache(maxsize=1024)
def entity_builder(
    source: SourceRef, entity_type: EntityType, precision: Precision
) -> EntityBuilder:
    """The (shared) :class:`EntityBuilder` of a source, entity type and precision."""
    return EntityBuilder(source, entity_type, precision)


def connection_status(
    source: SourceRef,
    state: str,
    reason: str | None = None,
    detail: str | None = None,
    at: datetime | None = None,
) -> Record:
    """A ``connection_status`` record: a source or the upstream changed state.

    ``remote_id`` is the component's name, so upstream keeps one current status per
    component. ``changed_at`` is part of the content, to the microsecond and from
    :data:`STATUS_CLOCK` (strictly increasing), so two changes never have one content,
    even in one second: going back to an earlier state (connected, failed, connected) is
    a new version and not a duplicate.
    """
    now = at or STATUS_CLOCK.stamp()
    changed = format_observed(now)
    data: dict[str, Any] = {
        "state": state,
        "reason": reason,
        "detail": detail,
        "changed_at": changed,
    }
    return Record.entity(
        source,
        EntityType.CONNECTION_STATUS,
        source.name,
        data,
        source_modified_at=changed,
        observed_at=now,
    )
