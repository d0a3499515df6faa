"""A lean local HTTP receiver for webhook deliveries (asyncio, requests parsed by httptools): what the demo and
``bench-webhooks`` deliver to. Each request's headers (lower-case names) and body go to ``handle``, which says
whether to answer 204 (True) or 401; every connection is closed after its answer, as the delivery worker's are."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import httptools

__all__ = ["Handler", "receiving"]

Handler = Callable[[dict[bytes, bytes], bytes], bool]

_ANSWERS = {True: b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            False: b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"}


class _Connection(asyncio.Protocol):
    def __init__(self, handle: Handler) -> None:
        self._handle = handle
        self._headers: dict[bytes, bytes] = {}
        self._body = bytearray()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        ok = self._handle(self._headers, bytes(self._body))
        if self._transport is not None:
            self._transport.write(_ANSWERS[ok])
            self._transport.close()


@contextlib.asynccontextmanager
async def receiving(handle: Handler) -> AsyncIterator[int]:
    """A receiver on a free port of 127.0.0.1 (the port), until the block ends."""
    server = await asyncio.get_running_loop().create_server(lambda: _Connection(handle), "127.0.0.1", 0,
                                                            backlog=1024)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
