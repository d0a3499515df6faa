"""Replaying dead letters into the projection: ``runledger dlq replay``.

Letters are applied in (stream, seq) order with the same code path as a worker
batch, each in a transaction of its own that also marks the letter replayed
and records the outcome, so an interrupted replay resumes by running it again
and a second run changes nothing. Events parked behind a letter follow it in
the same transaction. ``dry_run`` applies everything in one transaction that
is rolled back, so later letters see the effect of earlier ones, and nothing
is kept. A Redis lock keeps two replays of one schema from running at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import redis.asyncio as redis

from runledger.projections.postgres.db import StoreUnavailable, connect, connect_one
from runledger.projections.postgres.queries import query
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.pricing import load_tokencost_catalog
from runledger.projections.records import BatchResult, LogRecord
from runledger.schemas.errors import TransientError
from runledger.streams.producer.heads import RELEASE_IF_HELD
from runledger.streams.settings import Settings, redact_url

__all__ = ["ReplayItem", "ReplayLocked", "ReplayReport", "replay", "run_by"]

log = logging.getLogger(__name__)

LOCK_TTL_MS = 30_000
_REFRESH = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"


class ReplayLocked(TransientError):
    """Another replay of the same schema holds the lock."""

    code = "replay_locked"


@dataclass(frozen=True, slots=True)
class ReplayItem:
    """What became of one letter: ``projected``, ``duplicate``, ``parked``, ``failed`` or ``skipped``."""

    id: int
    stream: str | None
    seq: int | None
    outcome: str
    detail: str
    rows: dict[str, int] = field(default_factory=dict)
    cost_usd: Decimal = Decimal(0)


@dataclass(slots=True)
class ReplayReport:
    replay_id: int | None
    selected: int
    dry_run: bool
    items: list[ReplayItem] = field(default_factory=list)
    interrupted: bool = False

    @property
    def outcomes(self) -> dict[str, int]:
        return dict(Counter(i.outcome for i in self.items))


def run_by() -> str:
    """Who runs this: user@host, recorded with every replay and resolution."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


@contextlib.asynccontextmanager
async def _replay_lock(settings: Settings) -> AsyncIterator[None]:
    client = redis.from_url(settings.redis_dsn)
    key = f"{settings.topic_prefix}:dlq:replay:{settings.db_schema}"
    token = orjson.dumps({"by": run_by(), "pid": os.getpid(), "since": datetime.now(UTC).isoformat(),
                          "token": uuid.uuid4().hex}).decode()
    try:
        if not await client.set(key, token, nx=True, px=LOCK_TTL_MS):
            holder = await client.get(key)
            who = holder.decode(errors="replace") if isinstance(holder, bytes) else holder or "just finished"
            raise ReplayLocked(f"another replay of schema {settings.db_schema} is running ({who}); wait for it, "
                               f"or if it died, for its lock to expire (at most {LOCK_TTL_MS // 1000} s)")

        async def refresh() -> None:
            while True:
                await asyncio.sleep(LOCK_TTL_MS / 3000)
                await client.eval(_REFRESH, 1, key, token, LOCK_TTL_MS)

        keeper = asyncio.create_task(refresh())
        try:
            yield
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, redis.RedisError):
                await keeper
            with contextlib.suppress(redis.RedisError):
                await client.eval(RELEASE_IF_HELD, 1, key, token)
    except redis.RedisError as e:
        raise TransientError(f"cannot take the replay lock in Redis ({redact_url(settings.redis_url)}): {e}") from e
    finally:
        await client.aclose()


async def replay(settings: Settings, letters: list[asyncpg.Record], filter_json: dict[str, Any], *,
                 dry_run: bool = False, rate: float | None = None,
                 on_item: Callable[[ReplayItem], None] = lambda item: None) -> ReplayReport:
    """Replay ``letters`` (rows of ``dead_letters``, in replay order). See the module docstring."""
    pool = await connect(settings.database_dsn(), settings.db_schema, max_size=1)
    try:
        catalog = await ProjectionStore.load_catalog(pool) or load_tokencost_catalog()
        store = ProjectionStore(pool, catalog, settings.consumer_group)
        async with pool.acquire() as conn:
            if dry_run:
                report = ReplayReport(None, len(letters), dry_run=True)
                outer = conn.transaction()
                await outer.start()
                try:
                    await _run(conn, store, letters, report, rate, on_item)
                finally:
                    await outer.rollback()
                return report
            async with _replay_lock(settings):
                replay_id = await conn.fetchval(query("dlq_start_replay"), run_by(),
                                                orjson.dumps(filter_json).decode(), len(letters))
                report = ReplayReport(replay_id, len(letters), dry_run=False)
                status = "failed"
                try:
                    await _run(conn, store, letters, report, rate, on_item)
                    status = "done"
                except asyncio.CancelledError:
                    status, report.interrupted = "interrupted", True
                finally:
                    # A connection interrupted mid-query is unusable: record the end on a fresh one.
                    end = await connect_one(settings.database_dsn(), settings.db_schema)
                    try:
                        await end.execute(query("dlq_finish_replay"), replay_id, status,
                                          orjson.dumps(report.outcomes).decode())
                    finally:
                        await end.close()
                return report
    except (OSError, asyncpg.PostgresConnectionError) as e:
        raise StoreUnavailable(f"lost PostgreSQL during the replay: {e}") from e
    finally:
        await pool.close()


async def _run(conn: asyncpg.Connection, store: ProjectionStore, letters: list[asyncpg.Record],
               report: ReplayReport, rate: float | None, on_item: Callable[[ReplayItem], None]) -> None:
    started = time.monotonic()
    by = run_by()
    for n, letter in enumerate(letters):
        if rate:
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
        async with conn.transaction():
            item = await _replay_one(conn, store, letter, by)
            if report.replay_id is not None:
                await conn.execute(query("dlq_replay_item"), report.replay_id, item.id, item.outcome, item.detail)
        report.items.append(item)
        on_item(item)


async def _replay_one(conn: asyncpg.Connection, store: ProjectionStore, letter: asyncpg.Record,
                      by: str) -> ReplayItem:
    stream, seq = letter["stream_id"], letter["seq"]
    status = await conn.fetchval(query("dlq_lock_letter"), letter["id"])
    if status != "dead":
        return ReplayItem(letter["id"], stream, seq, "skipped", f"already {status}")
    record = LogRecord(letter["topic"], letter["partition"], letter["offset"],
                       bytes(letter["key"]) if letter["key"] is not None else None, bytes(letter["value"]),
                       attempts=letter["attempts"], first_failed=letter["first_failure_at"],
                       dead_letter_id=letter["id"])
    result = await store.apply_on(conn, [record])
    outcome, detail = _outcome(result, stream, seq)
    if outcome != "failed":
        await conn.execute(query("dlq_mark_replayed"), letter["id"], by)
    return ReplayItem(letter["id"], stream, seq, outcome, detail, dict(result.rows), result.cost_usd)


def _outcome(result: BatchResult, stream: str | None, seq: int | None) -> tuple[str, str]:
    if result.dead:
        failure = result.dead[0]
        return "failed", f"{failure.error.code}: {failure.error}"
    if (stream, seq) in result.projected:
        followers = sorted(s for st, s in result.projected if st == stream and s != seq)
        if followers:
            return "projected", f"parked seq {followers[0]}..{followers[-1]} followed"
        return "projected", "nothing was parked behind it"
    if result.duplicates:
        return "duplicate", "already projected: nothing changed"
    return "parked", (f"parked: an earlier seq of {stream} is not projected yet; it follows once that is "
                      "(see `runledger dlq list --stream`)")
