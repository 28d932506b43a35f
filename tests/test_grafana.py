"""packaging/grafana/: every expression of the dashboard and the alert rules names metrics
the agent exports, with labels they carry.

"Exports" is the metrics table of docs/operations.md, which tests/test_metrics.py holds to
what a running agent serves (both ways: nothing documented missing, nothing served
undocumented). So a renamed or removed family fails here, not on a gateway's dashboard.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.test_metrics import DOC

GRAFANA = Path(__file__).parents[1] / "packaging" / "grafana"
DASHBOARD = GRAFANA / "edge-agent.dashboard.json"
RULES = GRAFANA / "edge-agent.rules.yml"
# Labels Prometheus adds to every series of a scrape.
TARGET_LABELS = {"instance", "job"}
# What the rules must cover (issue 23): source down, upstream in reauthorization, backlog
# age, buffer horizon low, drops.
REQUIRED_ALERTS = {
    "EdgeAgentSourceDown",
    "EdgeAgentUpstreamReauthorization",
    "EdgeAgentBacklogOld",
    "EdgeAgentBufferHorizonLow",
    "EdgeAgentDropping",
}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "sum", "count", "min", "max", "avg", "rate", "increase", "time", "offset", "bool",
}  # fmt: skip


def exported() -> dict[str, set[str]]:
    """``{series name: labels}`` from the docs' metrics table (it names counters as
    exposed, with ``_total``)."""
    text = DOC.read_text()
    section = text[text.index("### Metrics") :]
    section = section[: section.index("\n#", 1)]
    out: dict[str, set[str]] = {}
    for name, labels in re.findall(
        r"^\| `(edge_agent_[a-z_]+)` \| (?:gauge|counter) \|([^|]*)\|", section, re.M
    ):
        out[name] = set(re.findall(r"`([a-z_]+)`", labels))
    return out


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return exprs


def rules() -> dict[str, str]:
    """``{alert: expr}`` of the rules file (one expression per line, as its header asks)."""
    out: dict[str, str] = {}
    alert = None
    for line in RULES.read_text().splitlines():
        if m := re.match(r"\s*- alert: (\w+)\s*$", line):
            alert = m.group(1)
            assert alert not in out, f"alert {alert} twice"
        elif (m := re.match(r"\s*expr: (.+)$", line)) and alert is not None:
            out[alert] = m.group(1).strip()
            alert = None
    return out


def check(expr: str, known: dict[str, set[str]]) -> list[str]:
    """What is wrong with ``expr``: unknown metrics, labels no metric of it carries."""
    bare = re.sub(r'"[^"]*"', '""', expr)  # label values are not names
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # nor range durations
    names = [n for n in re.findall(r"\b[a-z_][a-z0-9_]*\b", bare) if n.startswith("edge_agent_")]
    problems = [f"{n}: not exported" for n in names if n not in known]
    if not names and "up{" not in bare:
        problems.append("names no metric of the agent")
    labels = set(TARGET_LABELS)
    for n in names:
        labels |= known.get(n, set())
    used = set()
    for body in re.findall(r"\{([^}]*)\}", bare):
        used |= set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", body))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", bare):
        used |= {g.strip() for g in group.split(",") if g.strip()}
    problems += [f"label {label!r}: no metric of it has it" for label in sorted(used - labels)]
    return problems


def test_the_docs_table_has_labels() -> None:
    known = exported()
    assert known["edge_agent_source_up"] == {"source", "type"}
    assert known["edge_agent_buffer_horizon_class_seconds"] == {"class", "then"}
    assert "edge_agent_dropped_total" in known


def test_every_dashboard_expression_names_exported_metrics() -> None:
    known = exported()
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    problems = {e: p for e in exprs if (p := check(e, known))}
    assert not problems, problems


def test_every_alert_expression_names_exported_metrics() -> None:
    known = exported()
    alerts = rules()
    assert set(alerts) >= REQUIRED_ALERTS, REQUIRED_ALERTS - set(alerts)
    problems = {a: p for a, e in alerts.items() if (p := check(e, known))}
    assert not problems, problems


def test_the_check_catches_a_wrong_name_and_a_wrong_label() -> None:
    known = exported()
    assert check("edge_agent_source_upp == 0", known) == ["edge_agent_source_upp: not exported"]
    assert check('edge_agent_source_up{device="x"} == 0', known) == [
        "label 'device': no metric of it has it"
    ]
    assert check("sum by (class) (edge_agent_outbox_rows)", known) == []


def test_the_dashboard_is_importable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "edge-agent"
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert set(p["gridPos"]) == {"x", "y", "w", "h"}
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
