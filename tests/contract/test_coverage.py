"""Meta-test: every registered plugin is held to its contract.

A source type in the source registry without a harness in tests/contract/harness.py, or
a sink type in agent.sinks.base.SINKS without one in tests/contract/sink_harness.py,
would silently escape the conformance suites; this fails instead, naming it.
"""

from __future__ import annotations

from tests.contract import harness, sink_harness
from tests.contract.registry import sink_types, source_types


def test_every_registered_source_type_has_a_contract_harness() -> None:
    missing = [kind for kind in source_types() if not harness.HARNESSES.get(kind)]
    assert missing == [], (
        f"source types without a contract harness: {missing}; add one to "
        "tests/contract/harness.py (HARNESSES) - see docs/architecture.md"
    )


def test_every_harness_drives_a_registered_type() -> None:
    """A harness for a type nobody registers (renamed, removed) is dead code."""
    stale = sorted(set(harness.HARNESSES) - set(source_types()))
    assert stale == []
    for kind, classes in harness.HARNESSES.items():
        assert all(cls.type == kind for cls in classes), kind


def test_every_registered_sink_type_has_a_contract_harness() -> None:
    missing = [kind for kind in sink_types() if not sink_harness.SINK_HARNESSES.get(kind)]
    assert missing == [], (
        f"sink types without a contract harness: {missing}; add one to "
        "tests/contract/sink_harness.py (SINK_HARNESSES) - see docs/architecture.md"
    )
    stale = sorted(set(sink_harness.SINK_HARNESSES) - set(sink_types()))
    assert stale == []
    for kind, classes in sink_harness.SINK_HARNESSES.items():
        assert all(cls.type == kind for cls in classes), kind
