"""Edge rules: thresholds, states, rates and stale data evaluated in the agent.

See docs/rules.md. Rules run in a source's pipeline (:mod:`agent.pipeline`);
:class:`RuleConfig` is the ``[[sources.<name>.rules]]`` table.
"""

from agent.rules.config import RequestConfig, RuleConfig

__all__ = ["RequestConfig", "RuleConfig"]
