"""Run a test with each entity builder: the pure-Python reference and the C one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from agent import records

BUILDERS = ["python", "c"]
"""Parametrize with these; :func:`using` skips "c" (visibly) where it is not compiled."""

NOT_COMPILED = "agent._envelope is not compiled (needs gcc and libssl-dev; pip install -e .)"


@contextmanager
def using(name: str) -> Iterator[None]:
    """Build (and chain) entity versions with the ``name`` builder for the duration."""
    if name == "c" and records._envelope is None:
        pytest.skip(NOT_COMPILED)
    saved = records._splice, records._chain
    if name == "python":
        records._splice, records._chain = records.splice_python, records.chain_python
    else:
        records._splice, records._chain = records._envelope.build, records._envelope.chain
    try:
        yield
    finally:
        records._splice, records._chain = saved
