"""A real HTTP receiver on a free port (``http.server`` in a thread) for webhook tests: it keeps what it got, with
when, and answers as told (a fixed answer, or ``answer(headers, body)`` deciding per request)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Receiver", "receiving", "receiving_async"]


class Receiver:
    """What the receiver got (headers, body; ``times``: when each arrived, monotonic) and how it answers: status,
    extra headers, body, delay, or ``answer(headers, body)`` returning the status."""

    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.times: list[float] = []
        self.status, self.headers, self.body, self.delay_s = 204, {}, b"", 0.0
        self.answer: Callable[[dict[str, str], bytes], int] | None = None
        self.port = 0
        self.lock = threading.Lock()
        self.open = self.most_open = 0  # requests being answered now, and the most at once

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@contextlib.contextmanager
def receiving() -> Iterator[Receiver]:
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            with receiver.lock:
                receiver.got.append((headers, body))
                receiver.times.append(time.monotonic())
                status = receiver.answer(headers, body) if receiver.answer is not None else receiver.status
                receiver.open += 1
                receiver.most_open = max(receiver.most_open, receiver.open)
            time.sleep(receiver.delay_s)
            with receiver.lock:
                receiver.open -= 1
            self.send_response(status)
            for name, value in receiver.headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(receiver.body)))
            self.end_headers()
            self.wfile.write(receiver.body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


@contextlib.asynccontextmanager
async def receiving_async() -> AsyncIterator[Receiver]:
    """``receiving`` for an ``async with`` beside other asynchronous contexts."""
    with receiving() as receiver:
        yield receiver
