"""A private mosquitto broker for tests and benchmarks.

Started from ``/usr/sbin/mosquitto`` on a free 127.0.0.1 port with its own temp config
and persistence directory, so tests can stop and restart it (sessions and queued QoS 1
messages survive a graceful stop) and run concurrently with other suites.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.waiting import free_port, wait_port

MOSQUITTO = os.environ.get("MOSQUITTO", "/usr/sbin/mosquitto")


def have_mosquitto() -> bool:
    """Whether the broker binary is available."""
    return Path(MOSQUITTO).exists() or shutil.which(MOSQUITTO) is not None


@dataclass
class Tls:
    """Files of a TLS listener (server side) and what a client needs."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = False


@dataclass
class Mosquitto:
    """A private broker. ``start()``, ``stop()``, ``restart()``; ``port`` stays the same."""

    workdir: Path
    port: int = field(default_factory=free_port)
    tls: Tls | None = None
    tls_port: int | None = None
    max_inflight: int = 100
    proc: subprocess.Popen[bytes] | None = None
    extra: str = ""

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        if self.tls is not None and self.tls_port is None:
            self.tls_port = free_port()

    @property
    def log_file(self) -> Path:
        """The broker's log (useful when a test fails)."""
        return self.workdir / "mosquitto.log"

    def config_text(self) -> str:
        """The broker config: persistence on, anonymous access, generous queues."""
        lines = [
            # As root, mosquitto drops to user "mosquitto", which cannot write the private
            # temp dir (log, persistence): stay root there.
            *(["user root"] if os.geteuid() == 0 else []),
            "per_listener_settings false",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.workdir / 'data'}/",
            f"log_dest file {self.log_file}",
            "log_type all",
            f"max_inflight_messages {self.max_inflight}",
            "max_queued_messages 100000",
            f"listener {self.port} 127.0.0.1",
        ]
        if self.tls is not None:
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {self.tls.ca_file}",
                f"certfile {self.tls.cert_file}",
                f"keyfile {self.tls.key_file}",
                f"require_certificate {'true' if self.tls.require_certificate else 'false'}",
            ]
        return "\n".join(lines) + "\n" + self.extra

    def start(self) -> None:
        """Start the broker and wait until it accepts connections."""
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        with (self.workdir / "stderr.log").open("ab") as err:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=err
            )
        try:
            wait_port(self.port)
            if self.tls_port is not None:
                wait_port(self.tls_port)
        except TimeoutError:
            self.stop()
            raise

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the broker (SIGTERM saves the persistence file; SIGKILL does not)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Graceful stop, then start on the same port with the same persistence."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        """The broker log so far."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
