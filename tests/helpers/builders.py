"""Run a test with each entity builder: the pure-Python reference and the C one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from agent import records
from agent.records import EntityBuilder

BUILDERS = ["python", "c"]
"""Parametrize with these; :func:`using` skips "c" (visibly) where it is not compiled."""


@contextmanager
def using(name: str) -> Iterator[None]:
    """Make ``EntityBuilder.build`` the ``name`` builder for the duration."""
    if name == "c" and records._envelope is None:
        pytest.skip("agent._envelope is not compiled (needs gcc and libssl-dev; pip install -e .)")
    saved = EntityBuilder.build
    EntityBuilder.build = EntityBuilder.build_c if name == "c" else EntityBuilder.build_python  # type: ignore[method-assign]
    try:
        yield
    finally:
        EntityBuilder.build = saved  # type: ignore[method-assign]
