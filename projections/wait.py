"""Read-your-writes: wait until an appended event is projected, or learn why it will not be.

Workers send a PostgreSQL notification when a batch commits; a waiter wakes on
it (and re-checks at least once a second, in case a notification is missed),
so an answer comes within milliseconds of the commit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg

from projections.sql import query
from projections.store import NOTIFY_CHANNEL, StoreUnavailable, connect_one

__all__ = ["WaitResult", "wait_projected"]

_RECHECK_S = 1.0


@dataclass(frozen=True, slots=True)
class WaitResult:
    """Where one event stands.

    ``status``: ``projected`` (in the tables), ``rejected`` (a dead letter, ``dead_letter_id``: not
    unless replayed; ``reason`` is the code, ``error`` the message), or ``timeout`` (not yet;
    ``error`` says what it waits for).
    """

    stream_id: str
    seq: int
    status: str
    event_id: str | None = None
    hash: str | None = None
    reason: str | None = None
    error: str | None = None
    head_seq: int = 0
    waited_s: float = 0.0
    dead_letter_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def wait_projected(database_url: str, schema: str, stream_id: str, seq: int, *,
                         event_id: str | None = None, timeout: float = 30.0) -> WaitResult:
    """Return once ``stream_id`` seq ``seq`` is projected or rejected, or after ``timeout`` seconds.

    With ``event_id``, only that event counts: another event projected at the same
    seq (a fork) does not end the wait, and its own rejection does. Raises
    StoreUnavailable if PostgreSQL cannot be reached, ValueError on bad arguments.
    """
    if seq < 1:
        raise ValueError(f"seq: must be 1 or more, not {seq}")
    if event_id is not None:
        try:
            event_id = str(uuid.UUID(event_id))
        except ValueError:
            raise ValueError(f"id: {event_id!r} is not a UUID") from None
    started = time.monotonic()
    deadline = started + max(timeout, 0.0)
    conn = await connect_one(database_url, schema)
    woken = asyncio.Event()
    try:
        await conn.add_listener(NOTIFY_CHANNEL, lambda *_: woken.set())
        while True:
            woken.clear()
            result = await _check(conn, stream_id, seq, event_id)
            waited = round(time.monotonic() - started, 3)
            if result.status != "timeout" or time.monotonic() >= deadline:
                return WaitResult(**{**result.as_dict(), "waited_s": waited})
            try:
                await asyncio.wait_for(woken.wait(), min(_RECHECK_S, deadline - time.monotonic()))
            except TimeoutError:
                pass
    except (OSError, asyncpg.PostgresConnectionError) as e:
        raise StoreUnavailable(f"lost the PostgreSQL connection while waiting: {e}") from e
    finally:
        await conn.close()


async def _check(conn: asyncpg.Connection, stream_id: str, seq: int, event_id: str | None) -> WaitResult:
    try:
        rows = await conn.fetch(query("event_status"), stream_id, seq)
    except asyncpg.UndefinedTableError:
        return WaitResult(stream_id, seq, "timeout", error="the projection tables do not exist yet: no worker "
                          "has started on this schema")
    head = next((r for r in rows if r["status"] == "head"), None)
    head_seq = head["seq"] if head else 0
    mine = [r for r in rows if r["status"] != "head" and (event_id is None or r["event_id"] == event_id)]
    for status in ("projected", "rejected"):
        row = next((r for r in mine if r["status"] == status), None)
        if row is not None:
            return WaitResult(stream_id, seq, status, row["event_id"], row["hash"], row["reason"], row["error"],
                              head_seq, dead_letter_id=row["rank"] if status == "rejected" else None)
    if any(r["status"] == "parked" for r in mine):
        why = f"parked: it arrived before seq {head_seq + 1}, which is not projected yet"
    elif head_seq >= seq:
        why = f"seq {seq} is projected, but by another event than {event_id}"
    else:
        why = f"not projected yet: the stream is projected up to seq {head_seq}"
    return WaitResult(stream_id, seq, "timeout", event_id, error=why, head_seq=head_seq)
