"""A raw HTTP/1.1 upstream on 127.0.0.1 that answers every request the same chosen way.

For answers no well-behaved server sends: a 300 MiB body, a gzip bomb, a chunked error
page that never ends. The body is produced chunk by chunk while the client reads, so the
server itself holds one chunk at a time, whatever the answer's size; a client that
stops reading and closes ends it. It records each request's ``X-Request-ID``.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tests.helpers.tcppeer import TcpPeer

MIB = 1 << 20
CHUNK = 64 << 10


@dataclass
class Answer:
    """What the upstream answers: status, headers, and a factory of body chunks."""

    status: int
    headers: dict[str, str]
    body: Callable[[], Iterator[bytes]]
    chunked: bool = False  # Transfer-Encoding: chunked (else Content-Length or close)


def repeated(total: int, prefix: bytes = b"", fill: bytes = b" ") -> Callable[[], Iterator[bytes]]:
    """A body of ``total`` bytes: ``prefix`` then ``fill`` repeated, in 64 KiB chunks."""

    def chunks() -> Iterator[bytes]:
        yield prefix
        block = fill * (CHUNK // len(fill))
        left = total - len(prefix)
        while left > 0:
            yield block[: min(left, len(block))]
            left -= len(block)

    return chunks


def bomb(inflated_mib: int, coding: str) -> bytes:
    """A compressed body (``gzip`` or zlib-wrapped ``deflate``) of ``inflated_mib`` MiB of
    zeros, about 1000 times smaller. Built in well under a second: after a full flush the
    compressor keeps no history, so every further MiB of zeros compresses to the same
    bytes, and only the checksum is computed over the whole."""
    zero = bytes(MIB)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    segment = deflater.compress(zero) + deflater.flush(zlib.Z_FULL_FLUSH)
    end = deflater.flush()
    raw = segment * inflated_mib + end
    if coding == "gzip":
        crc = 0
        for _ in range(inflated_mib):
            crc = zlib.crc32(zero, crc)
        trailer = struct.pack("<II", crc, (inflated_mib * MIB) & 0xFFFFFFFF)
        return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + raw + trailer
    adler = 1
    for _ in range(inflated_mib):
        adler = zlib.adler32(zero, adler)
    return b"\x78\xda" + raw + struct.pack(">I", adler)


def sliced(data: bytes) -> Callable[[], Iterator[bytes]]:
    """``data`` as 64 KiB chunks."""
    return lambda: (data[i : i + CHUNK] for i in range(0, len(data), CHUNK))


class RawUpstream(TcpPeer):
    """``async with RawUpstream(answer) as up``: ``up.url``, ``up.request_ids``."""

    def __init__(self, answer: Answer) -> None:
        super().__init__()
        self.answer = answer
        self.request_ids: list[str] = []

    @property
    def url(self) -> str:
        """The base URL to configure as ``upstream.url``."""
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer requests until one answer ends with the connection."""
        while await self._one(reader, writer):
            pass

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection is to be closed."""
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        headers = {}
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        await reader.readexactly(int(headers.get("content-length", "0")))
        rid = headers.get("x-request-id", "")
        self.request_ids.append(rid)
        a = self.answer
        fields = {**a.headers, "X-Request-ID": rid}
        if a.chunked:
            fields["Transfer-Encoding"] = "chunked"
        lines = [f"HTTP/1.1 {a.status} Whatever", *(f"{k}: {v}" for k, v in fields.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        for chunk in a.body():
            if not chunk:
                continue  # an empty chunk would end a chunked body
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if a.chunked else chunk)
            await writer.drain()
        if a.chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        # Without Content-Length or chunking the body ends when the connection does.
        return a.chunked or "Content-Length" in a.headers
