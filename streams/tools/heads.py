"""``runledger heads check``: the chain heads as Redis, the log and PostgreSQL's projection each have them.

An operator's check, kept out of the producer so that appending never loads the PostgreSQL side.
"""

from __future__ import annotations

import contextlib
from typing import Any

import asyncpg
from redis.asyncio import Redis

from runledger.projections.postgres.db import StoreUnavailable, connect_one
from runledger.streams.producer.epoch import read_epoch
from runledger.streams.producer.heads import parse_head
from runledger.streams.producer.recovery import log_chains
from runledger.streams.settings import Settings

__all__ = ["check_heads"]


async def check_heads(settings: Settings) -> list[dict[str, Any]]:
    """One row per stream whose heads disagree: Redis, the log and PostgreSQL's projection (``stream_heads``).

    PostgreSQL disagrees when its head is beyond the log's, when it is at the log's seq with another hash, and
    when it has none for a stream of the log (workers may simply be behind). If its heads cannot be read (no
    database, a schema never migrated), only Redis and the log are compared.
    """
    log, _ = await log_chains(settings)
    redis = Redis.from_url(settings.redis_dsn)
    try:
        complete = (await read_epoch(redis, settings.topic_prefix)).current
        streams = sorted(log)
        raw = [await redis.hgetall(f"{settings.topic_prefix}:head:{s}") for s in streams]
    finally:
        await redis.aclose()
    projected: dict[str, tuple[int, str]] | None = None  # None: PostgreSQL's heads could not be read
    with contextlib.suppress(StoreUnavailable, asyncpg.UndefinedTableError):
        conn = await connect_one(settings.database_dsn(), settings.db_schema)
        try:
            projected = {r["stream_id"]: (r["seq"], r["hash"]) for r in await conn.fetch(
                "SELECT stream_id, seq, hash FROM stream_heads WHERE stream_id = ANY($1::text[])", streams)}
        finally:
            await conn.close()
    rows = []
    for stream, head in zip(streams, raw, strict=True):
        chain = log[stream]
        log_head = chain.head
        redis_head = parse_head(head)[0] if head else None
        redis_seq, redis_hash = (redis_head.seq, redis_head.hash) if redis_head else (None, None)
        problems = []
        if redis_seq is None and complete:
            problems.append("Redis has no head although it is marked complete: an append would start it at seq 1")
        elif redis_seq and chain.branch.get(redis_seq) != redis_hash and redis_seq <= log_head.seq:
            problems.append(f"Redis's head (seq {redis_seq}, hash {redis_hash}) is not on the log's first branch, "
                            f"which workers project (seq {redis_seq}: hash {chain.branch.get(redis_seq)}): an append "
                            f"would extend the other branch; `runledger heads repair --stream {stream}` moves it back")
        elif redis_seq is not None and redis_seq < log_head.seq:
            problems.append(f"Redis is behind the log (seq {redis_seq} < {log_head.seq}): an append would fork it")
        elif redis_seq is not None and redis_seq > log_head.seq:
            problems.append(f"Redis is ahead of the log's first branch (seq {redis_seq} > {log_head.seq}): it is on "
                            "another branch, or events were lost from the log; `runledger heads repair --stream "
                            f"{stream}` moves it back")
        if chain.forks:
            problems.append(f"the log holds two events at seq {', '.join(map(str, chain.forks))}")
        pg_seq, pg_hash = (projected or {}).get(stream, (None, None))
        if projected is not None and pg_seq is None and log_head.seq > 0:
            problems.append(f"PostgreSQL has no head for the stream, the log is at seq {log_head.seq}: workers may "
                            f"simply be behind, or its first event was dead-lettered")
        elif pg_seq is not None and pg_seq > log_head.seq:
            problems.append(f"PostgreSQL projected seq {pg_seq}, beyond the log's {log_head.seq}")
        elif pg_seq == log_head.seq and pg_hash != log_head.hash:
            problems.append(f"PostgreSQL's head at seq {pg_seq} has hash {pg_hash}, the log's event at seq "
                            f"{pg_seq} hashes to {log_head.hash}: the projection followed another chain")
        if problems:
            rows.append({"stream": stream, "redis": redis_seq, "log": log_head.seq, "projected": pg_seq,
                         "problems": problems})
    if not complete:
        rows.append({"stream": None, "redis": None, "log": None, "projected": None,
                     "problems": ["Redis's heads are not marked complete in this run of Redis (it restarted or lost "
                                  "its data): they are recovered from the log at the next append, or now with "
                                  "`runledger heads recover`"]})
    return rows
