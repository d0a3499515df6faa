"""The demo's webhooks: a receiver it starts on a free local port and an endpoint owed every event of the run, which
a ``runledger webhooks worker`` (the demo's subprocess, its log in ``<state dir>/webhooks.log``) delivers to it.

The receiver checks each delivery's Standard Webhooks signature with the endpoint's secret (HMAC-SHA256 over
``id.timestamp.body``, as the ``standardwebhooks`` packages do) and counts what it got: deliveries, distinct
messages, signatures refused, streams that arrived out of seq order. The endpoints of earlier demos are removed
(their receivers are gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson

from runledger.projections.postgres.db import connect_one
from runledger.streams.dev.receiver import receiving
from runledger.streams.settings import Settings
from runledger.streams.webhooks.sender import signature_header

__all__ = ["DemoHooks", "demo_webhooks"]

WEBHOOKS_COMMAND = (sys.executable, "-m", "runledger.streams.cli", "webhooks", "worker")


@dataclass
class DemoHooks:
    """What the demo's receiver got."""

    url: str
    endpoint_id: str
    secret: str
    deliveries: int = 0
    refused: int = 0
    out_of_order: set[str] = field(default_factory=set)
    messages: set[str] = field(default_factory=set)
    _last_seq: dict[str, int] = field(default_factory=dict)

    def verified(self, headers: dict[bytes, bytes], body: bytes) -> bool:
        msg_id = headers.get(b"webhook-id", b"").decode()
        stamp = headers.get(b"webhook-timestamp", b"").decode()
        if not stamp.isdigit():
            return False
        expected = signature_header([self.secret], msg_id, int(stamp), body)
        given = headers.get(b"webhook-signature", b"").decode().split()
        return abs(time.time() - int(stamp)) <= 300 and any(hmac.compare_digest(expected, s) for s in given)

    def got(self, headers: dict[bytes, bytes], body: bytes) -> bool:
        if not self.verified(headers, body):
            self.refused += 1
            return False
        self.deliveries += 1
        msg_id = headers[b"webhook-id"].decode()
        if msg_id not in self.messages:
            self.messages.add(msg_id)
            event = orjson.loads(body)
            stream, seq = event["subject"], event["seq"]
            if seq < self._last_seq.get(stream, 0):
                self.out_of_order.add(stream)
            self._last_seq[stream] = max(seq, self._last_seq.get(stream, 0))
        return True


@contextlib.asynccontextmanager
async def demo_webhooks(settings: Settings, run_tag: str) -> AsyncIterator[DemoHooks]:
    """A receiver and an endpoint owed the run's streams (``<run_tag>:``), until the block ends. The demo runs the
    delivery worker (``WEBHOOKS_COMMAND``) as it runs the projection worker: started and stopped outside the event
    loop, so that a SIGTERM anywhere stops it."""
    from runledger.streams.http.keys import init_key

    holder: list[DemoHooks] = []
    async with receiving(lambda headers, body: holder[0].got(headers, body)) as port:
        init_key(settings)
        holder.append(await _endpoint(settings, run_tag, port))
        yield holder[0]


async def _endpoint(settings: Settings, run_tag: str, port: int) -> DemoHooks:
    """The run's endpoint (its id the run's tag), owed the run's streams; those of earlier demos removed."""
    from runledger.streams.http.keys import load_key
    from runledger.streams.webhooks.endpoints import Filter, add_endpoint

    conn = await connect_one(settings.database_dsn(), settings.db_schema)
    try:
        await conn.execute("UPDATE webhook_endpoints SET removed_at = now(), enabled = false "
                           "WHERE endpoint_id LIKE 'demo-%' AND removed_at IS NULL")
        added = await add_endpoint(conn, load_key(settings), f"http://127.0.0.1:{port}/demo",
                                   Filter(stream_prefix=f"{run_tag}:"), allow_private=True, endpoint_id=run_tag)
    finally:
        await conn.close()
    return DemoHooks(f"http://127.0.0.1:{port}/demo", added["endpoint_id"], added["secret"])


async def wait_delivered(hooks: DemoHooks, total: int, timeout: float) -> None:
    """Until the receiver has every message of the run (or ``timeout`` seconds have passed: the summary says)."""
    deadline = time.monotonic() + timeout
    while len(hooks.messages) < total and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
