"""Read-your-writes: wait until an appended event is projected, or learn why it will not be.

Workers send a PostgreSQL notification when a batch commits; a waiter wakes on
it (and re-checks at least once a second, in case a notification is missed),
so an answer comes within milliseconds of the commit. A wait that cannot end
says why: the stream's partition is held back (``stalled``: the log no longer
matches what was projected, see ``runledger.streams.worker.logcheck``), or no worker of the
group is running.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg
from aiokafka.partitioner import murmur2

from runledger.projections.postgres.db import NOTIFY_CHANNEL, StoreUnavailable, connect_one
from runledger.projections.postgres.queries import query

__all__ = ["WORKER_GONE_S", "WaitResult", "no_worker", "stream_partition", "wait_projected"]

_RECHECK_S = 1.0
WORKER_GONE_S = 10.0
"""A worker not seen for this long counts as stopped (workers refresh their row every 2 s)."""


@dataclass(frozen=True, slots=True)
class WaitResult:
    """Where one event stands.

    ``status``: ``projected`` (in the tables), ``rejected`` (a dead letter, ``dead_letter_id``: not
    unless replayed; ``reason`` is the code, ``error`` the message), ``stalled`` (the workers hold the
    stream's partition back; ``error`` says why and what fixes it), or ``timeout`` (not yet;
    ``error`` says what it waits for, and if no worker is running).
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
                         event_id: str | None = None, timeout: float = 30.0, group_id: str | None = None,
                         topic: str | None = None, recheck_s: float = _RECHECK_S,
                         note: Callable[[str], None] | None = None) -> WaitResult:
    """Return once ``stream_id`` seq ``seq`` is projected or rejected, or after ``timeout`` seconds.

    With ``event_id``, only that event counts: another event projected at the same
    seq (a fork) does not end the wait, and its own rejection does. With ``group_id``
    and ``topic`` (the log), a partition the group's workers hold back ends the wait
    (``stalled``), and a timeout says whether any worker of the group is running.
    ``recheck_s``: how often to look without a notification; ``note`` hears at once if
    no worker is running (the wait goes on: one may start). Raises StoreUnavailable
    if PostgreSQL cannot be reached, ValueError on bad arguments.
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
    asked = False  # whether a worker is running, at the start and at the end only
    try:
        await conn.add_listener(NOTIFY_CHANNEL, lambda *_: woken.set())
        while True:
            woken.clear()
            result = await _check(conn, stream_id, seq, event_id)
            if result.status == "timeout" and group_id is not None and topic is not None:
                result = await _stalled(conn, result, group_id, topic) or result
            waited = round(time.monotonic() - started, 3)
            last = time.monotonic() >= deadline
            if result.status == "timeout" and group_id is not None and (not asked or last):
                asked = True
                gone = await no_worker(conn, group_id)
                if gone and note is not None:
                    note(gone)
                    note = None
                if gone and last:
                    result = WaitResult(**{**result.as_dict(), "error": f"{result.error}; {gone}"})
            if result.status != "timeout" or time.monotonic() >= deadline:
                return WaitResult(**{**result.as_dict(), "waited_s": waited})
            try:
                await asyncio.wait_for(woken.wait(), min(recheck_s, deadline - time.monotonic()))
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


def stream_partition(stream_id: str, partitions: int) -> int:
    """The partition of ``stream_id`` in a log of ``partitions`` (the Java client's murmur2, SPEC.md section 1)."""
    return int(murmur2(stream_id.encode()) & 0x7FFFFFFF) % partitions


async def _stalled(conn: asyncpg.Connection, result: WaitResult, group_id: str, topic: str) -> WaitResult | None:
    try:
        problems = await conn.fetch(query("problems"), group_id, topic)
    except asyncpg.UndefinedTableError:
        return None
    for p in problems:
        if p["partition"] == stream_partition(result.stream_id, p["partitions"]):
            return WaitResult(**{**result.as_dict(), "status": "stalled",
                                 "error": f"the workers hold its partition back: {p['problem']}"})
    return None


async def no_worker(conn: asyncpg.Connection, group_id: str) -> str | None:
    """Why nothing will be projected if no worker of ``group_id`` is alive, else None."""
    try:
        alive = await conn.fetch(query("live_workers"), group_id, WORKER_GONE_S)
    except asyncpg.UndefinedTableError:
        alive = []
    if alive:
        return None
    return (f"no worker of group {group_id} is running (none seen in the last {WORKER_GONE_S:.0f} s): start one "
            "with `runledger worker`")

