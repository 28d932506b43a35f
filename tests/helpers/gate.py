"""A TCP proxy on 127.0.0.1 that holds, passes or refuses a real peer's connections.

Put between an agent and its real peer (a broker, a Modbus server, PostgreSQL), it makes
the states a source goes through as plain as the peer's own behaviour would, and on cue:

* ``held`` (at start): connections are accepted and nothing is passed on, either way; a
  client waits for its peer's first answer (an MQTT CONNACK, a Modbus reply, PostgreSQL's
  startup answer) - the source has proven nothing yet;
* :meth:`open`: what was held is passed on, and everything after it;
* :meth:`refuse`: every connection is closed and the port stops listening (connection
  refused), as when the peer's host goes down;
* :meth:`open` again: the port listens again, on the same number.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self


class Gate:
    """``async with Gate(target_port) as gate``: ``gate.port`` leads to the target."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open = asyncio.Event()
        self._conns: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        await self._listen()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.refuse()

    async def open(self) -> None:
        """Pass connections on (held ones too); listen again after :meth:`refuse`."""
        if self._server is None:
            await self._listen()
        self._open.set()

    async def refuse(self) -> None:
        """Close every connection and stop listening."""
        self._open.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port or 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            await self._open.wait()  # held: the client's bytes wait in the reader
            up_reader, upstream = await asyncio.open_connection(self.host, self.target_port)
            pipes = {
                asyncio.create_task(_pipe(reader, upstream)),
                asyncio.create_task(_pipe(up_reader, writer)),
            }
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass  # the target is down, or the gate closed: the client sees its end
        finally:
            self._conns.discard(task)
            for w in (writer, upstream):
                if w is not None:
                    w.close()
                    with contextlib.suppress(OSError, asyncio.CancelledError):
                        await w.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
