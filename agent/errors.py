"""The agent's small error hierarchy.

Callers decide what to do by class, never by parsing messages:

* :class:`ConfigError`: the configuration is wrong; a person must fix it.
* :class:`TransientError`: try again later (backoff); carries what the peer said.
* :class:`PermanentError`: retrying the same input cannot help; a sink's two verdicts on
  a whole batch are kinds of it: :class:`BatchTooLarge` (split it) and
  :class:`BatchRejected` (bisect it down to the refused records).
* :class:`ReauthorizationRequired`: credentials were refused; keep buffering and wait for
  new ones.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration is invalid. ``problems`` lists ``(key_path, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(f"{k}: {m}" if k else m for k, m in problems))


class TransientError(AgentError):
    """A failure that may pass: retry with backoff.

    ``status`` is the peer's status code when there was one, ``retry_after`` the delay in
    seconds it asked for, ``request_id`` the id to quote to the peer's operators.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.request_id = request_id


class PermanentError(AgentError):
    """Retrying the same input cannot succeed (for example a rejected record)."""

    def __init__(
        self, message: str, *, status: int | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.request_id = request_id


class BatchTooLarge(PermanentError):
    """The upstream refuses a batch this large (HTTP 413): send it in smaller parts."""


class BatchRejected(PermanentError):
    """The upstream refuses the whole batch for something in it (another HTTP 4xx):
    ``code`` and the message say what; bisecting finds the refused records."""

    def __init__(
        self, message: str, *, status: int, code: str | None, request_id: str | None
    ) -> None:
        super().__init__(message, status=status, request_id=request_id)
        self.code = code


class ReauthorizationRequired(AgentError):
    """Credentials were refused (HTTP 401/403, database login failure).

    ``reason`` is ``unauthorized`` or ``forbidden`` (or a source-specific word).
    """

    def __init__(
        self, message: str, *, reason: str = "unauthorized", request_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.request_id = request_id


class OutboxWriteError(TransientError):
    """The outbox could not commit (disk full, I/O error). Nothing was stored: retry."""
