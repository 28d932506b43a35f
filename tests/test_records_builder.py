"""The C entity builder (agent._envelope) gives exactly what the Python reference gives.

Same records, same bytes, and the same exception for an input that cannot be encoded
(the SQL sync quarantines a row with the exception's class name in its reason).
"""

from __future__ import annotations

import os
import subprocess
import sys
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


@needs_c
@settings(max_examples=300)
@given(
    remote_id=st.text(),
    data=_dicts,
    prev=st.uuids().map(str) | st.text(),
    shift=st.sampled_from([0, 0, 0, -1, 1, -10_000, 10_000]),
)
def test_c_chain_equals_the_reference(
    remote_id: str, data: dict[str, Any], prev: str, shift: int
) -> None:
    """The writer's step: the chained id in place of the provisional one, same bytes in
    C and Python; a wrong offset (``shift``) is refused by both, never patched."""
    try:
        rec = records.Record.entity(SourceRef("s", "sql"), EntityType.ASSET, remote_id, data)
    except Exception:  # not encodable: test_c_builder_equals_the_reference covers it
        return
    args = (records.NS.bytes, rec.entity_id, rec.content_hash, prev, rec.to_json(),
            rec._id_at + shift, rec.id)  # fmt: skip
    got = records._envelope.chain(*args)
    assert got == records.chain_python(*args)
    if shift:
        assert got is None
        return
    assert got is not None
    rid, body = got
    assert rid == records.chain_id(rec.entity_id, rec.content_hash, prev)
    assert body == records.canonical_json({**rec.envelope(), "id": rid})
    assert records.chained(rec, prev) == got


@needs_c
def test_c_chain_rejects_wrong_arguments_instead_of_crashing() -> None:
    from agent import _envelope  # noqa: PLC0415

    rid = "6d7bd69b-96ea-547d-a514-db3e83dc4493"
    good: list[Any] = [b"n" * 16, "e", "h", "p", b'{"id":"' + rid.encode() + b'"}', 7, rid]
    assert _envelope.chain(*good) is not None
    with pytest.raises(TypeError, match="7 arguments"):
        _envelope.chain(*good[:6])
    with pytest.raises(TypeError, match="prev must be str"):
        _envelope.chain(*good[:3], b"p", *good[4:])
    with pytest.raises(TypeError, match="body must be bytes"):
        _envelope.chain(*good[:4], "body", *good[5:])
    with pytest.raises(ValueError, match="16 bytes"):
        _envelope.chain(b"short", *good[1:])
    with pytest.raises(TypeError):
        _envelope.chain(*good[:5], "7", rid)
    assert _envelope.chain(*good[:5], 2**62, rid) is None


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
