"""Code tables: how a raw state or fault code reads upstream (shared by sources and
equipment profiles)."""

from __future__ import annotations

from typing import Any, Literal

from agent.configtypes import Section

Severity = Literal["none", "info", "warning", "minor", "major", "critical"]


class Code(Section):
    """How one raw state or fault code reads upstream."""

    code: str
    """Normalized code sent upstream (e.g. ``door_fault``)."""
    text: str = ""
    """Human text."""
    severity: Severity = "info"
    """Severity of the event."""


def translate(
    raw: Any, codes: dict[str, Code], unknown_severity: Severity, kind: str
) -> dict[str, Any]:
    """The event fields of a raw code: normalized ``code``, ``text``, ``severity``."""
    key = str(int(raw)) if isinstance(raw, bool | int | float) else str(raw).strip()
    entry = codes.get(key)
    if entry is None:
        return {
            "code": f"unknown_{key}",
            "text": f"unknown {kind} code {key}",
            "severity": unknown_severity,
        }
    return {"code": entry.code, "text": entry.text, "severity": entry.severity}
