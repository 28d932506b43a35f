"""THE runner of the real agent as a subprocess (``python -m agent --config F run``).

One class for every suite that runs the daemon as journald would see it: its stderr goes
to a file, and since that is not a TTY the logs are JSON lines. Helpers read the log and
the local API and wait for conditions with a deadline (never a bare sleep): async ones
for suites on an event loop (``await agent.status()``), ``*_sync`` ones for the
synchronous reliability suites, whose peers run in other processes.

Also here: :func:`outbox_rows`, the outbox file read with plain sqlite3 while the agent
runs (or after it was killed).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import waiting

ROOT = Path(__file__).resolve().parents[2]


def agent_env(**extra: str) -> dict[str, str]:
    """The environment for an agent subprocess: this worktree's package first, none of
    the test runner's own agent or systemd settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "NOTIFY_"))}
    env.pop("WATCHDOG_USEC", None)
    env.pop("WATCHDOG_PID", None)
    return {**env, "PYTHONPATH": str(ROOT), **extra}


class AgentProcess:
    """One agent subprocess on a config file; ``env`` adds environment variables."""

    def __init__(self, config_file: Path, log_file: Path, **env: str) -> None:
        self.config_file = config_file
        self.log_file = log_file
        self.env = agent_env(**env)
        self.proc: subprocess.Popen[bytes] | None = None
        listen = self.config().get("api", {}).get("listen", "127.0.0.1:8080")
        self.url = f"http://{listen}"
        """The local API's base URL (``api.listen`` of the config at construction: a
        test may later write an invalid config to see a reload refused)."""

    # ------------------------------------------------------------------ config

    def config(self) -> dict[str, Any]:
        """The config file, parsed."""
        return tomllib.loads(self.config_file.read_text())

    @property
    def state_dir(self) -> Path:
        """Where the outbox lives (``agent.state_dir`` of the config)."""
        return Path(self.config()["agent"]["state_dir"])

    @property
    def outbox(self) -> Path:
        """The outbox file."""
        return self.state_dir / "outbox.db"

    # ------------------------------------------------------------------ process

    def start(self, **popen: Any) -> AgentProcess:
        """Start the agent (does not wait for it)."""
        with self.log_file.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "--config", str(self.config_file), "run"],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                **popen,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Fail with the log's tail when the agent has exited (not when never started
        or killed)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.tail()}")

    def send(self, sig: signal.Signals) -> None:
        """Send a signal (SIGHUP: reload; SIGTERM: stop)."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye; what was not committed is not committed."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM and wait for the exit code (killed, and failing, after ``timeout``)."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"agent did not stop within {timeout}s:\n{self.tail()}") from None
        self.proc = None
        return code

    # ------------------------------------------------------------------ log

    def log(self) -> str:
        """Everything the agent logged so far (JSON lines)."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def tail(self, lines: int = 40) -> str:
        """The log's last lines."""
        return "\n".join(self.log().splitlines()[-lines:])

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Log events (only those named ``name``, if given), oldest first."""
        out = []
        for line in self.log().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "<not json>", "line": line}
            if name is None or event.get("event") == name:
                out.append(event)
        return out

    def count(self, event: str) -> int:
        """How many events named ``event`` were logged."""
        return len(self.events(event))

    # ------------------------------------------------------------------ API (async)

    async def get(self, path: str) -> httpx.Response:
        """GET on the local API."""
        async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
            return await http.get(self.url + path)

    async def status(self) -> dict[str, Any]:
        """``/v1/status``."""
        result: dict[str, Any] = (await self.get("/v1/status")).json()
        return result

    async def wait_event(self, event: str, n: int = 1, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until ``event`` was logged ``n`` times; the n-th one."""
        await wait_for(lambda: self.count(event) >= n, timeout, f"log event {event} x{n}", self)
        return self.events(event)[n - 1]

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until /healthz answers (failing at once if the agent exits)."""

        async def up() -> bool:
            self.check_alive()
            try:
                return (await self.get("/healthz")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_for(up, timeout, "agent API up", self)

    async def wait_exit(self, timeout: float = 60.0) -> int:
        """Wait until the process has exited; its exit code."""
        assert self.proc is not None
        proc = self.proc
        await wait_for(lambda: proc.poll() is not None, timeout, "agent exit", self)
        return proc.returncode

    # ------------------------------------------------------------------ API (sync)

    def get_sync(self, path: str) -> httpx.Response | None:
        """GET on the local API; None while it does not answer."""
        try:
            return httpx.get(self.url + path, timeout=5, trust_env=False)
        except httpx.HTTPError:
            return None

    def status_sync(self, timeout: float = 180.0) -> dict[str, Any]:
        """``/v1/status`` (waits for the API to answer)."""
        answer = waiting.wait_until(lambda: self.get_sync("/v1/status"), "agent API answers",
                                    timeout, self.tail)  # fmt: skip
        result: dict[str, Any] = answer.json()
        return result

    def wait_ready_sync(self, timeout: float = 180.0) -> None:
        """Wait until /healthz answers (failing at once if the agent exits)."""

        def up() -> bool:
            self.check_alive()
            answer = self.get_sync("/healthz")
            return answer is not None and answer.status_code == 200

        waiting.wait_until(up, "agent API up", timeout, self.tail)


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = 30.0,
    what: str = "condition",
    agent: AgentProcess | None = None,
) -> None:
    """:func:`tests.helpers.waiting.wait_for`, failing with the tail of the agent's log."""
    await waiting.wait_for(condition, timeout, what,
                           detail=(lambda: agent.tail(30)) if agent else None)  # fmt: skip


def outbox_rows(
    db: Path, sql: str = "SELECT id, body FROM records ORDER BY seq", args: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    """Rows of the outbox file, read with plain sqlite3 (safe while the agent runs); none
    before the agent created it."""
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []  # the schema is not created yet
        raise
    finally:
        con.close()
