"""Hypothesis strategies shared by the record tests."""

from __future__ import annotations

from datetime import UTC

from hypothesis import strategies as st

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.binary(max_size=8)
    | st.datetimes(timezones=st.none() | st.just(UTC))
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
dicts = st.dictionaries(st.text(), values, max_size=5)
"""JSON-ish record payloads, with the values orjson needs ``default`` for (Decimal, bytes)."""
