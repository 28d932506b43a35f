"""Edge rules: golden telemetry sequences (tests/cases/rules/<name>/) through a real outbox.

See tests/rules_harness.py for the input format. Regenerate after a deliberate change
with ``UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from agent import config as cfg
from agent.errors import ConfigError
from tests.rules_harness import Case

CASES = Path(__file__).parent / "cases" / "rules"


@pytest.mark.parametrize("name", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
async def test_golden_case(name: str, tmp_path: Path) -> None:
    folder = CASES / name
    got = await Case(folder, tmp_path).run()
    expected_file = folder / "expected.jsonl"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        expected_file.write_bytes(b"".join(orjson.dumps(g) + b"\n" for g in got))
    expected = [orjson.loads(x) for x in expected_file.read_text().splitlines() if x.strip()]
    assert got == expected


RULE_BASE = """
[agent]
state_dir = "{state}"
[upstream]
url = "https://upstream.example"
token = "t"
[sources.feed]
type = "mqtt"
host = "127.0.0.1"
client_id = "x"
[[sources.feed.subscriptions]]
topic = "lifts/{{asset}}"
points = [{{ name = "t", path = "t" }}]
"""


@pytest.mark.parametrize(
    ("rules", "key", "message"),
    [
        (
            'name = "a"\ntype = "threshold"\npoint = "t"\n',
            "sources.feed.rules.0",
            "'above' or 'below'",
        ),
        ('name = "a"\ntype = "stale"\npoint = "t"\n', "sources.feed.rules.0", "'after'"),
        (
            'name = "a"\ntype = "rate"\npoint = "t"\nmax = 1\nper = "soon"\n',
            "sources.feed.rules.0.per",
            "invalid duration",
        ),
        (
            'name = "a"\ntype = "state"\npoint = "t"\nvalues = [1]\nfor = "1h"\nfour = 1\n',
            "sources.feed.rules.0.four",
            "unknown key",
        ),
        (
            'name = "a b"\ntype = "state"\npoint = "t"\nvalues = [1]\n',
            "sources.feed.rules.0",
            "rule name",
        ),
        (
            'name = "a"\ntype = "threshold"\npoint = "t"\nabove = 5\nclear_below = 6\n',
            "sources.feed.rules.0",
            "clear_below",
        ),
    ],
)
def test_bad_rules_are_config_errors_with_key_paths(
    tmp_path: Path, rules: str, key: str, message: str
) -> None:
    text = RULE_BASE.format(state=tmp_path) + "[[sources.feed.rules]]\n" + rules
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        cfg.load(path)
    problems = dict(exc.value.problems)
    assert key in problems, problems
    assert message in problems[key]


def test_duplicate_rule_names_are_refused(tmp_path: Path) -> None:
    rule = '[[sources.feed.rules]]\nname = "a"\ntype = "state"\npoint = "t"\nvalues = [1]\n'
    path = tmp_path / "c.toml"
    path.write_text(RULE_BASE.format(state=tmp_path) + rule + rule)
    with pytest.raises(ConfigError) as exc:
        cfg.load(path)
    assert "duplicate rule name 'a'" in dict(exc.value.problems)["sources.feed.rules"]


def test_for_delay_is_read_from_the_for_key(tmp_path: Path) -> None:
    rule = '[[sources.feed.rules]]\nname = "a"\ntype = "state"\npoint = "t"\nvalues = [1]\nfor = "15m"\n'
    path = tmp_path / "c.toml"
    path.write_text(RULE_BASE.format(state=tmp_path) + rule)
    settings, _ = cfg.load(path)
    assert settings.sources["feed"].rules[0].for_ == 900
