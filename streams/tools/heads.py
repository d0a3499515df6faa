"""``runledger heads check``: the chain heads as Redis, the log and PostgreSQL's projection each have them.

An operator's check, kept out of the producer so that appending never loads the PostgreSQL side.
"""

from __future__ import annotations

import contextlib
from typing import Any

import asyncpg
from redis.asyncio import Redis

from runledger.projections.postgres.db import StoreUnavailable, connect_one
from runledger.streams.producer.recovery import log_heads, marker_key
from runledger.streams.settings import Settings

__all__ = ["check_heads"]


async def check_heads(settings: Settings) -> list[dict[str, Any]]:
    """One row per stream whose heads disagree: Redis, the log and PostgreSQL's projection (``stream_heads``)."""
    log = await log_heads(settings)
    redis = Redis.from_url(settings.redis_url)
    try:
        complete = bool(await redis.exists(marker_key(settings.topic_prefix)))
        streams = sorted(log)
        raw = [await redis.hgetall(f"{settings.topic_prefix}:head:{s}") for s in streams]
    finally:
        await redis.aclose()
    projected: dict[str, int] = {}
    with contextlib.suppress(StoreUnavailable, asyncpg.UndefinedTableError):
        conn = await connect_one(settings.database_url, settings.db_schema)
        try:
            projected = {r["stream_id"]: r["seq"] for r in await conn.fetch("SELECT stream_id, seq FROM stream_heads")}
        finally:
            await conn.close()
    rows = []
    for stream, head in zip(streams, raw, strict=True):
        log_head = log[stream]
        redis_seq = int(head[b"seq"]) if head else None
        problems = []
        if redis_seq is None and complete:
            problems.append("Redis has no head although it is marked complete: an append would start it at seq 1")
        elif redis_seq is not None and redis_seq < log_head.seq:
            problems.append(f"Redis is behind the log (seq {redis_seq} < {log_head.seq}): an append would fork it")
        elif redis_seq is not None and redis_seq > log_head.seq:
            problems.append(f"Redis is ahead of the log (seq {redis_seq} > {log_head.seq}): a batch is staged, or "
                            "events were lost from the log")
        if log_head.forks:
            problems.append(f"the log holds two events at seq {', '.join(map(str, log_head.forks))}")
        if projected.get(stream, 0) > log_head.seq:
            problems.append(f"PostgreSQL projected seq {projected[stream]}, beyond the log's {log_head.seq}")
        if problems:
            rows.append({"stream": stream, "redis": redis_seq, "log": log_head.seq,
                         "projected": projected.get(stream), "problems": problems})
    if not complete:
        rows.append({"stream": None, "redis": None, "log": None, "projected": None,
                     "problems": ["Redis is not marked complete: its heads are recovered from the log at the next "
                                  "append, or now with `runledger heads recover`"]})
    return rows
