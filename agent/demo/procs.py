"""Child processes of the demo: mosquitto, the receiver and the agent.

Each child gets ``PR_SET_PDEATHSIG`` so the kernel stops it if the demo itself dies (even
by SIGKILL): the demo never leaves a process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def find_mosquitto() -> str | None:
    """The mosquitto binary (PATH, then Debian's /usr/sbin)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Processes:
    """Starts, watches and stops the demo's children; logs go to the demo directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.children: dict[str, asyncio.subprocess.Process] = {}
        self.expected_exit: set[str] = set()

    async def _spawn(self, name: str, argv: list[str], port: int) -> None:
        log = (self.dir / f"{name}.log").open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=log,
            stderr=log,
            stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            env=env,
        )
        log.close()
        self.children[name] = proc
        self.expected_exit.discard(name)
        deadline = time.monotonic() + 30
        while not _port_open(port):
            if proc.returncode is not None or time.monotonic() > deadline:
                tail = (self.dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} did not start (see {self.dir}/{name}.log):\n{tail}")
            await asyncio.sleep(0.05)

    async def start_mosquitto(self, binary: str, port: int) -> None:
        """A private broker on 127.0.0.1:port, with persistence in the demo directory."""
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.dir}/\nmax_queued_messages 100000\n"
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        await self._spawn("mosquitto", [binary, "-c", str(conf)], port)

    async def start_receiver(self, port: int, db: Path, token: str) -> None:
        """The reference receiver (the upstream stand-in)."""
        await self._spawn(
            "receiver",
            [
                sys.executable,
                "-m",
                "agent",
                "receiver",
                "--listen",
                f"127.0.0.1:{port}",
                "--db",
                str(db),
                "--token",
                token,
            ],
            port,
        )

    async def start_agent(self, config: Path, api_port: int) -> None:
        """The agent itself, exactly as systemd would run it."""
        await self._spawn(
            "agent", [sys.executable, "-m", "agent", "--config", str(config), "run"], api_port
        )

    async def stop(self, name: str, timeout: float = 30) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        proc = self.children.get(name)
        if proc is None or proc.returncode is not None:
            return
        self.expected_exit.add(name)
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    def died(self) -> str | None:
        """The name of a child that exited without being asked to, if any."""
        for name, proc in self.children.items():
            if proc.returncode is not None and name not in self.expected_exit:
                return name
        return None

    async def stop_all(self) -> None:
        """Stop every child: the agent first (it drains), the broker last."""
        for name in ("agent", "receiver", "mosquitto"):
            await self.stop(name)
