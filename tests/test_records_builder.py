"""The C entity builder (agent._envelope) gives exactly what the Python reference gives.

Same records, same bytes, and the same exception for an input that cannot be encoded
(the SQL sync quarantines a row with the exception's class name in its reason).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent import records
from agent.records import EntityBuilder, EntityType, Op, SourceRef, builder_implementation
from tests.helpers import strategies
from tests.helpers.builders import NOT_COMPILED, using

needs_c = pytest.mark.skipif(records._envelope is None, reason=NOT_COMPILED)
_dicts = strategies.dicts
_times = st.none() | st.text(max_size=30)


def _outcome(build: Any, *args: Any) -> tuple[str, Any]:
    try:
        rec = build(*args)
    except Exception as exc:  # the class is what is compared
        return "raised", type(exc)
    return "built", (rec, rec.to_json())


@needs_c
@settings(max_examples=400)
@given(
    source=st.text(min_size=1),
    site=st.none() | st.text(),
    entity_type=st.sampled_from(list(EntityType)),
    precision=st.sampled_from(["second", "minute", "day", "none"]),
    remote_id=st.text(),
    data=_dicts,
    op=st.sampled_from(list(Op)),
    custom=_dicts,
    remote=st.none() | _dicts,
    modified=_times,
    observed=st.text(max_size=30),
)
@example(  # a lone surrogate cannot be encoded: both fail, and alike
    source="s", site=None, entity_type=EntityType.ASSET, precision="day", remote_id="\ud800",
    data={}, op=Op.UPSERT, custom={}, remote=None, modified=None, observed="t",
)  # fmt: skip
@example(  # a value orjson cannot encode
    source="s", site=None, entity_type=EntityType.ASSET, precision="day", remote_id="1",
    data={"x": object()}, op=Op.DELETE, custom={}, remote={}, modified="m", observed="t",
)  # fmt: skip
def test_c_builder_equals_the_reference(
    source: str,
    site: str | None,
    entity_type: EntityType,
    precision: Any,
    remote_id: str,
    data: dict[str, Any],
    op: Op,
    custom: dict[str, Any],
    remote: dict[str, Any] | None,
    modified: str | None,
    observed: str,
) -> None:
    builder = EntityBuilder(SourceRef(source, "sql", site), entity_type, precision)
    args = (remote_id, data, op, custom, remote, modified, observed)
    with using("python"):
        reference = _outcome(builder.build, *args)
    with using("c"):
        assert _outcome(builder.build, *args) == reference


@needs_c
def test_c_builder_keeps_a_large_row_intact() -> None:
    builder = EntityBuilder(SourceRef("erp", "sap_ecc"), EntityType.WORK_ORDER, "day")
    data = {f"f{i}": "x" * 1000 + str(i) for i in range(200)} | {"n": Decimal("1.50")}
    at = datetime(2026, 11, 22, tzinfo=UTC).isoformat()
    args = ("000004711", data, Op.UPSERT, {"k": 1}, {"ROW": 2}, at, at)
    with using("python"):
        py = builder.build(*args)
    with using("c"):
        c = builder.build(*args)
    assert c == py
    assert c.to_json() == py.to_json()
    assert len(c.to_json()) > 200_000


@needs_c
def test_c_builder_rejects_wrong_arguments_instead_of_crashing() -> None:
    from agent import _envelope  # noqa: PLC0415

    good = [b"n" * 16, b"s:t:", b"1", b'"1"', b'"upsert"', b"{}", b"{}", None]
    good += [b"m", b"p", b'"o"', b"s", b"null"]
    assert len(_envelope.build(*good)) == 4
    with pytest.raises(TypeError, match="13 arguments"):
        _envelope.build(*good[:12])
    with pytest.raises(TypeError, match="data must be bytes"):
        _envelope.build(*good[:5], "{}", *good[6:])
    with pytest.raises(ValueError, match="16 bytes"):
        _envelope.build(b"short", *good[1:])


def _link_inputs(
    steps: list[tuple[int, int]], known_ids: list[bool], shift: int
) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Rows and versions of one append (entity i gets content c; entity -1 is a reading),
    and what entity_versions knows of the first entities (with or without a last id)."""
    rows: list[Any] = []
    versions: list[Any] = []
    for n, (entity, content) in enumerate(steps):
        if entity < 0:
            rec = records.Record.reading(
                SourceRef("s", "mqtt"), EntityType.EVENT, "p", datetime(2026, 1, 1, tzinfo=UTC),
                {"n": n},
            )  # fmt: skip
            rows.append((rec.id, rec.entity_id, "event", "reading", 1.0, 9, rec.to_json(), -1))
            versions.append(None)
            continue
        rec = records.Record.entity(
            SourceRef("s", "sql"), EntityType.ASSET, f"A{entity}", {"c": content}
        )
        rid, body, at = records.chainable(rec)
        rows.append((rid, rec.entity_id, "asset", "business", 1.0, len(body), body, at + shift))
        versions.append((f"s:asset:A{entity}", rec.content_hash[7:39], rec.content_hash))
    known = {
        f"s:asset:A{i}": (records.Record.entity(
            SourceRef("s", "sql"), EntityType.ASSET, f"A{i}", {"c": 0}).content_hash[7:39],
            "6d7bd69b-96ea-547d-a514-db3e83dc4493" if with_id else None)
        for i, with_id in enumerate(known_ids)
    }  # fmt: skip
    return rows, versions, known


def _run_link(link: Any, *args: Any) -> Any:
    latest: dict[str, Any] = {}
    try:
        return link(*args, latest), latest
    except Exception as exc:  # the class and message are what is compared
        return type(exc), str(exc)


@needs_c
@settings(max_examples=300)
@given(
    steps=st.lists(st.tuples(st.integers(-1, 3), st.integers(0, 2)), max_size=12),
    known_ids=st.lists(st.booleans(), max_size=4),
    shift=st.sampled_from([0, 0, 0, 0, -1, 1]),
)
def test_c_link_equals_the_reference(
    steps: list[tuple[int, int]], known_ids: list[bool], shift: int
) -> None:
    """The writer's loop: dedupe, the chain from epoch or last id, the rows kept; the same
    from C and Python, and a wrong id offset refused by both (nothing written there)."""
    rows, versions, known = _link_inputs(steps, known_ids, shift)
    args = (records.NS.bytes, "0e5c6d1f-2a3b-4c4d-9e5f-60718293a4b5", rows, versions, known)
    got = _run_link(records._envelope.link, *args)
    assert got == _run_link(records.link_python, *args)
    if shift:  # refused, unless no version needed an id (all unchanged)
        if got[0] is not ValueError:
            ids = got[0][1]
            assert all(i is None for i, v in zip(ids, versions, strict=True) if v is not None)
        return
    (keep, ids, unchanged), latest = got
    want_ids, want_latest = _model_link(rows, versions, known, args[1])
    assert (ids, latest) == (want_ids, want_latest)
    assert [r[0] for r in keep] == [i for i in ids if i is not None]
    assert unchanged == ids.count(None)


def _model_link(
    rows: list[Any], versions: list[Any], known: dict[str, Any], epoch: str
) -> tuple[list[str | None], dict[str, Any]]:
    """The ids and the final ``latest`` that DESIGN.md's rule gives, written plainly."""
    last = dict(known)
    ids: list[str | None] = []
    latest: dict[str, Any] = {}
    for row, version in zip(rows, versions, strict=True):
        if version is None:
            ids.append(row[0])
            continue
        entity, digest, chash = version
        if entity in last and last[entity][0] == digest:
            ids.append(None)
            continue
        prev = last[entity][1] if entity in last and last[entity][1] else epoch
        rid = str(uuid.uuid5(records.NS, f"{row[1]}:{chash}:{prev}"))
        ids.append(rid)
        last[entity] = latest[entity] = (digest, rid)
    return ids, latest


@needs_c
def test_c_link_rejects_wrong_arguments_instead_of_crashing() -> None:
    from agent import _envelope  # noqa: PLC0415

    rows, versions, known = _link_inputs([(0, 1), (-1, 0)], [], 0)
    good: list[Any] = [b"n" * 16, "epoch", rows, versions, known, {}]
    assert len(_envelope.link(*good)[0]) == 2
    with pytest.raises(TypeError, match="6 arguments"):
        _envelope.link(*good[:5])
    with pytest.raises(ValueError, match="16 bytes"):
        _envelope.link(b"short", *good[1:])
    with pytest.raises(ValueError, match="differ in length"):
        _envelope.link(*good[:3], versions[:1], known, {})
    with pytest.raises(TypeError, match="8-tuple"):
        _envelope.link(*good[:2], [rows[0][:7], rows[1]], versions, known, {})
    with pytest.raises(TypeError, match="3-tuple or None"):
        _envelope.link(*good[:3], [versions[0][:2], None], known, {})
    with pytest.raises(TypeError, match="prev must be str"):
        _envelope.link(*good[:4], {versions[0][0]: ("x", 5)}, {})
    bad = (*rows[0][:6], "body", rows[0][7])
    with pytest.raises(TypeError, match="body must be bytes"):
        _envelope.link(*good[:2], [bad, rows[1]], versions, known, {})


def test_pure_python_can_be_forced() -> None:
    """EDGE_AGENT_PURE_PYTHON=1 runs the reference, whatever is compiled."""
    code = "from agent.records import builder_implementation as b; print(b())"
    env = dict(os.environ, EDGE_AGENT_PURE_PYTHON="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "python"
    expected = "python" if records._envelope is None else "c"
    assert builder_implementation() == expected


@needs_c
def test_a_stale_c_build_is_not_trusted() -> None:
    """A compiled module of another ABI (left in a source tree after an update that
    changed build()) is ignored: the reference builds the records."""
    code = (
        "import agent._envelope as e; e.ABI += 1; import agent.records as r; "
        "print(r.builder_implementation())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert out.stdout.strip() == "python"
