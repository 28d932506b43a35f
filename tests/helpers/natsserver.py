"""Private ``nats-server -js`` processes for tests and benchmarks: one server, or a
JetStream cluster of several on loopback cluster ports; a proxy that answers late.

Each server has its own config file, store directory and free ports, so tests can kill and
restart it (same ports, same store) and run beside other suites. ``stored`` reads a
stream's messages straight from a server (its own short-lived connection, in a thread, so
sync test code can call it while the test's loop runs the sink).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from tests.helpers.waiting import free_port, wait_port

NATS_SERVER = os.environ.get("NATS_SERVER", "nats-server")


def have_nats_server() -> bool:
    """Whether the ``nats-server`` binary is available."""
    return shutil.which(NATS_SERVER) is not None or Path("/usr/sbin/nats-server").exists()


def _binary() -> str:
    return shutil.which(NATS_SERVER) or "/usr/sbin/nats-server"


@dataclass
class NatsServer:
    """One server. ``start()``, ``stop()``, ``kill()``, ``restart()``, ``reload()``."""

    workdir: Path
    name: str = "n1"
    port: int = field(default_factory=free_port)
    cluster_port: int | None = None
    routes: list[int] = field(default_factory=list)
    token: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:port``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        """The server's log (useful when a test fails)."""
        return self.workdir / f"{self.name}.log"

    def config_text(self) -> str:
        """JetStream on, a private store, token auth when ``token`` is set."""
        lines = [
            f"server_name: {self.name}",
            "host: 127.0.0.1",
            f"port: {self.port}",
            f"jetstream {{ store_dir: {str(self.workdir / ('store-' + self.name))!r} }}",
        ]
        if self.token is not None:
            lines.append(f"authorization {{ token: {self.token!r} }}")
        if self.cluster_port is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            lines.append(
                f"cluster {{ name: edge-test, host: 127.0.0.1, port: {self.cluster_port}, "
                f"routes: [{routes}] }}"
            )
        return "\n".join(lines) + "\n"

    def write_config(self) -> Path:
        path = self.workdir / f"{self.name}.conf"
        path.write_text(self.config_text())
        return path

    def start(self, wait: bool = True) -> NatsServer:
        """Start (or restart) the server on its ports with its store."""
        conf = self.write_config()
        with self.log_file.open("ab") as logf:
            self.proc = subprocess.Popen(
                [_binary(), "-c", str(conf)], stdout=logf, stderr=subprocess.STDOUT
            )
        if wait:
            wait_port(self.port, 20)
        return self

    def stop(self) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: what a crashed node looks like."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def reload(self) -> None:
        """Rewrite the config and make the running server re-read it (SIGHUP)."""
        self.write_config()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)


def cluster(workdir: Path, size: int = 3) -> list[NatsServer]:
    """``size`` servers that form one JetStream cluster (not started)."""
    ports = [free_port() for _ in range(size)]
    return [
        NatsServer(
            workdir,
            name=f"n{i + 1}",
            cluster_port=ports[i],
            routes=[p for j, p in enumerate(ports) if j != i],
        )
        for i in range(size)
    ]


async def stream_messages(
    urls: list[str], stream: str, token: str | None = None
) -> list[tuple[str, bytes]]:
    """``(Nats-Msg-Id, payload)`` of every message of ``stream``, in stream order."""
    nc = await nats.connect(
        servers=urls,
        token=token,
        connect_timeout=5,
        allow_reconnect=False,
        max_reconnect_attempts=0,
    )
    try:
        js = nc.jetstream(timeout=5)
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return []
        out: list[tuple[str, bytes]] = []
        if not info.state.messages:
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                msg = await js.get_msg(stream, seq)
                out.append(((msg.headers or {}).get("Nats-Msg-Id", ""), msg.data or b""))
        return out
    finally:
        await nc.close()


def stored_sync(urls: list[str], stream: str, token: str | None = None) -> list[str]:
    """Msg ids of ``stream`` in order, from sync code (its own loop in a thread)."""
    box: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            msgs = asyncio.run(stream_messages(urls, stream, token))
            box.append([mid for mid, _ in msgs])
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    if errors:
        raise errors[0]
    return box[0] if box else []


async def wait_stream_leader(urls: list[str], stream: str, timeout: float = 30.0) -> str:
    """The name of ``stream``'s leader, once it has one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            nc = await nats.connect(
                servers=urls, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0
            )
            try:
                info = await nc.jetstream(timeout=2).stream_info(stream)
                if info.cluster is not None and info.cluster.leader:
                    return info.cluster.leader
            finally:
                await nc.close()
        except (nats.errors.Error, OSError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"stream {stream} has no leader")
        await asyncio.sleep(0.2)


async def refused(url: str, token: str | None, timeout: float = 30.0) -> None:
    """Wait until ``token`` is refused by the server at ``url`` (a reload took effect)."""
    deadline = time.monotonic() + timeout
    while True:
        nc = Client()
        try:
            await nc.connect(
                servers=[url],
                token=token,
                connect_timeout=2,
                allow_reconnect=False,
                max_reconnect_attempts=0,
            )
        except Exception as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            if "Authorization" in repr(exc):
                return
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)  # cut while the server reloads: ask again
            continue
        await nc.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server at {url} still takes the old token")
        await asyncio.sleep(0.1)


class LateProxy:
    """A TCP proxy to a server that can hold the server's bytes back (``delay``) and
    refuse or cut connections (``pause``/``resume``): the sink's view of a slow or gone
    peer, while the server itself (and what it stored) stays reachable directly."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.delay = 0.0
        self.cut_next_publish = False
        """Cut the connection that sends the next publish (before the server sees it)."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Stop listening and cut every connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_w}
        down = asyncio.ensure_future(self._pipe(up_r, writer, late=True))
        up = asyncio.ensure_future(self._pipe(reader, up_w, late=False))
        self._tasks |= {down, up}
        try:
            await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (down, up):
                t.cancel()
            for w in (writer, up_w):
                w.transport.abort()
                self._writers.discard(w)
            self._tasks -= {down, up}

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, late: bool
    ) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            if not late and self.cut_next_publish and b"PUB " in data:
                self.cut_next_publish = False
                writer.transport.abort()
                return
            if late and self.delay:
                await asyncio.sleep(self.delay)
            writer.write(data)
            await writer.drain()
