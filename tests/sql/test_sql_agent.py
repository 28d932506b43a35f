"""The SQL source under the real supervisor: a subprocess agent, a reload, a clean stop."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.helpers.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
[agent]
id = "test-gw"
site = "plant-1"
state_dir = "{state}"

[logging]
format = "json"

[upstream]
url = "https://ingest.invalid"
# No upstream in this test: do not spend the default 30 s draining at stop.
drain_timeout = "1s"

[sources.cmms]
type = "sql"
profile = "declarative"
url = "sqlite+aiosqlite:///file:{db}?mode=ro&uri=true"
interval = "{interval}"
initial_window = "3650d"

[sources.cmms.entities.work_orders]
entity_type = "work_order"
table = "wo"
key = ["wonum"]
cursor = "changed_at"
fields = {{ title = "descr" }}

[sources.cmms.mappings.work_orders]
rename = {{ title = "{title}" }}
"""


def records(state: Path) -> list[dict[str, object]]:
    path = state / "outbox.db"
    if not path.exists():
        return []
    con = sqlite3.connect(path)
    try:
        rows = con.execute("SELECT body FROM records ORDER BY seq").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()
    return [orjson.loads(b) for (b,) in rows]


@pytest.mark.slow
def test_agent_syncs_and_applies_a_mapping_change_on_reload(tmp_path: Path):
    db, state, conf = tmp_path / "cmms.db", tmp_path / "state", tmp_path / "config.toml"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE wo (wonum TEXT PRIMARY KEY, descr TEXT, changed_at TEXT)")
    con.executemany(
        "INSERT INTO wo VALUES (?, ?, ?)",
        [(f"WO-{i}", f"job {i}", f"2026-11-20 08:00:0{i}") for i in range(3)],
    )
    con.commit()
    conf.write_text(CONFIG.format(state=state, db=db, interval="200ms", title="title"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "--config", str(conf), "run"],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: len(records(state)) == 3, "the initial sync")
        assert records(state)[0]["data"] == {"title": "job 0"}
        conf.write_text(CONFIG.format(state=state, db=db, interval="200ms", title="name"))
        proc.send_signal(signal.SIGHUP)
        con.execute("UPDATE wo SET descr = 'job 1, edited', changed_at = '2026-11-21' "
                    "WHERE wonum = 'WO-1'")  # fmt: skip
        con.commit()
        wait_until(lambda: len(records(state)) >= 4, "the change after the reload")
        last = records(state)[-1]
        assert last["remote_id"] == "WO-1"
        assert last["data"] == {"name": "job 1, edited"}, "mapping from the reloaded config"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        con.close()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"sql_sync_completed" in err
