"""Edge rules: thresholds, states, rates and stale data evaluated in the agent.

See docs/rules.md. :func:`run_source` is the supervisor's hook; :class:`RuleConfig` is
the ``[[sources.<name>.rules]]`` table.
"""

from agent.rules.config import RequestConfig, RuleConfig

__all__ = ["RequestConfig", "RuleConfig"]
