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
    saved = records._splice, records._link
    if name == "python":
        records._splice, records._link = records.splice_python, records.link_python
    else:
        records._splice, records._link = records._envelope.build, records._envelope.link
    try:
        yield
    finally:
        records._splice, records._link = saved
