"""Full-jitter exponential backoff, shared by every retry loop in the agent."""

from __future__ import annotations

import random


class Backoff:
    """``delay()`` returns uniform(0, min(cap, initial * 2**attempt)) and counts attempts.

    Full jitter (AWS architecture blog, "Exponential Backoff And Jitter") spreads retries
    of many agents after a shared outage, so they do not reconnect in lock-step.
    """

    def __init__(self, initial: float = 1.0, cap: float = 300.0) -> None:
        self.initial = initial
        self.cap = cap
        self.attempt = 0

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return float(min(self.cap, self.initial * (2.0 ** min(self.attempt, 62))))

    def delay(self, at_least: float = 0.0) -> float:
        """The next delay (at least ``at_least``, e.g. a Retry-After), and count it."""
        value = random.uniform(0, self.ceiling())  # noqa: S311 - jitter, not crypto
        self.attempt += 1
        return max(value, at_least)

    def reset(self) -> None:
        """Back to the first delay after a success."""
        self.attempt = 0
