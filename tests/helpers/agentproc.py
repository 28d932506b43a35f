"""Run the agent as a subprocess (``python -m agent run``) against a temp config."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class AgentProcess:
    """The agent in a child process; stderr (JSON log lines) goes to a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start ``python -m agent --config FILE run`` from the repo root."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        env.pop("EDGE_AGENT_CONFIG", None)
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "--config", str(self.config), "run"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye; what was not committed is not committed."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def log_text(self) -> str:
        """Everything the agent logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def assert_alive(self) -> None:
        """Fail with the log when the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log_text()}")


def outbox_rows(db: Path, sql: str = "SELECT id, body FROM records ORDER BY seq") -> list[tuple]:
    """Rows of the outbox file, read with plain sqlite3 (safe while the agent runs)."""
    if not db.exists():
        return []
    con = sqlite3.connect(db, timeout=10)
    try:
        return con.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []  # schema not created yet
    finally:
        con.close()
