"""``edge-agent status --watch``: the status table redrawn in place on a terminal (a real
pty), the same content as ``edge-agent status``; Ctrl-C (SIGINT) ends it cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

from agent import ctl
from tests.agent_harness import running_agent, settings_for

CLEAR = "\x1b[H\x1b[2J"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def test_watch_redraws_in_place_and_ends_on_ctrl_c(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    url = f"http://{settings.api.listen}"
    async with running_agent(settings):
        master, slave = pty.openpty()
        _set_size(slave, 60, 160)
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "status", "--url", url, "--watch", "0.3"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=Path(__file__).parents[1],
        )
        os.close(slave)
        loop = asyncio.get_running_loop()
        seen = ""
        try:
            async with asyncio.timeout(60):
                while seen.count(CLEAR) < 3:  # two full frames, and the third begun
                    chunk = await loop.run_in_executor(None, os.read, master, 65536)
                    seen += chunk.decode(errors="replace")
            proc.send_signal(signal.SIGINT)  # what Ctrl-C on the terminal sends
            async with asyncio.timeout(30):
                code = await loop.run_in_executor(None, proc.wait)
            with contextlib.suppress(OSError):  # the rest: leaving the alternate screen
                while chunk := os.read(master, 65536):
                    seen += chunk.decode(errors="replace")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)
    assert code == 0
    assert "Traceback" not in seen
    assert seen.startswith("\x1b[?1049h")  # the alternate screen, as top does
    assert seen.rstrip().endswith("\x1b[?1049l")  # and back to the shell's screen
    frames = [ANSI.sub("", f) for f in seen.split(CLEAR)[1:3]]
    for frame in frames:
        lines = frame.replace("\r\n", "\n").splitlines()
        assert lines[0].startswith(f"edge-agent status {url}  every 0.3s")
        assert "Ctrl-C quits" in lines[0]
        # The same content as `edge-agent status`: its agent line, upstream and outbox.
        assert lines[2].startswith("agent     test-agent")
        assert any(line.startswith("upstream  state ") for line in lines)
        assert any(line.startswith("outbox    ") for line in lines)
        assert any("buffer horizon measuring" in line for line in lines)
        assert all(len(line) <= 160 for line in lines)


def test_a_frame_shows_an_unreachable_agent_and_goes_on() -> None:
    frame = ctl.watch_frame("http://127.0.0.1:9", None, 2.0, 200, 50)
    assert "edge-agent: edge-agent is not running" in frame
    assert frame.splitlines()[0].startswith("edge-agent status http://127.0.0.1:9  every 2s")
