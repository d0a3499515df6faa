"""Applying a batch of log records to the projection tables, in one transaction.

``ProjectionStore.apply_batch`` locks the batch's streams, loads what the
planner (``runledger.projections.planner``) needs, and writes the plan it
returns: the projection rows, the audit rows, the stream heads, the dead
letters, the outbox and the Kafka offsets, so that a batch is applied entirely
or not at all, and applying it again changes nothing. Copies of what leaves the
batch for the retry topics or the dead-letter topic are rows of ``outbox`` in
the same transaction; they are published after it commits
(``runledger.streams.worker.outbox``).

A batch that PostgreSQL refuses is split in halves, and each half applied on
its own, until the record that causes the refusal stands alone: it alone is
dead-lettered as ``rejected_by_database``, and the rest is projected.

A batch takes its locks in one order: the apply lock (shared), its streams' advisory locks, then, last, the
rows of its partitions' trees. The time spent in those statements is the batch's ``lock_wait_s``; a lock
held by another transaction past ``lock_timeout`` fails the attempt with ``StoreLockTimeout``, for the caller
to try again in place.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg

from runledger.projections.planner import (
    AUDIT_COLUMNS,
    COST_COLUMNS,
    BatchPlanner,
    Decoded,
    Loaded,
    Parked,
    Plan,
    Policy,
    ProjectedEvent,
    decoded,
)
from runledger.projections.postgres.db import (
    LockWaits,
    RejectedByDatabase,
    StoreConflict,
    StoreLockTimeout,
    StoreUnavailable,
    database_error,
)
from runledger.projections.postgres.queries import query
from runledger.projections.postgres.trees import grow
from runledger.projections.pricing import ModelPrice, PriceCatalog
from runledger.projections.records import BatchResult, LogRecord, ProcessingFailed, Route, pg_text
from runledger.projections.rules import ExecutionState, StepState
from runledger.schemas.chain import Head
from runledger.schemas.errors import PermanentError

__all__ = ["ProjectionStore"]

_AUDIT_TOPIC, _AUDIT_PARTITION, _AUDIT_OFFSET = (AUDIT_COLUMNS.index(c) for c in ("kafka_topic", "kafka_partition",
                                                                                "kafka_offset"))

log = logging.getLogger(__name__)


# Failures that the record causes, found by applying the batch in halves.
_ISOLATED = (RejectedByDatabase, ProcessingFailed)
# A unique-key race with another transaction is retried in place this often before the record is taken
# for one PostgreSQL refuses (the per-stream locks make a real race rare).
_CONFLICT_TRIES = 3


class ProjectionStore:
    """Applies batches of log records to the projection tables of one schema.

    ``max_attempts`` is how many deliveries a record gets before a transient failure
    becomes the dead letter ``retries_exhausted`` (1 + the retry topics' count). ``after_locks``, if given, is
    awaited in each transaction once the batch holds all its locks, before it commits (a fault injected by tests:
    ``Settings.test_stop_after_locks``).
    """

    def __init__(self, pool: asyncpg.Pool, catalog: PriceCatalog, group_id: str, *, max_attempts: int = 6,
                 after_locks: Callable[[], Awaitable[None]] | None = None) -> None:
        self._pool = pool
        self.catalog = catalog
        self._group_id = group_id
        self.max_attempts = max_attempts
        self._after_locks = after_locks
        self.transactions = 0
        """Transactions begun by this store's batches so far, rolled back ones included (a batch's own count, in
        its result, is exact while the store applies one batch at a time, as a worker's agent and a replay do)."""

    @staticmethod
    async def save_catalog(pool: asyncpg.Pool, catalog: PriceCatalog) -> None:
        """Store a catalog version (once; a version never changes)."""
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(query("insert_catalog"), catalog.version, catalog.source, len(catalog.prices))
            await conn.executemany(query("insert_price"), [
                (catalog.version, p.model, p.provider, p.input, p.output, p.cached)
                for p in catalog.prices.values()])

    @staticmethod
    async def load_catalog(pool: asyncpg.Pool | asyncpg.Connection) -> PriceCatalog | None:
        """The newest catalog version stored, or None."""
        version = await pool.fetchval(query("current_catalog"))
        if version is None:
            return None
        rows = await pool.fetch(query("load_prices"), version)
        return PriceCatalog(version, "database", {
            r["model"]: ModelPrice(r["model"], r["provider"], r["input_usd_per_token"], r["output_usd_per_token"],
                                   r["cached_usd_per_token"]) for r in rows})

    async def load_offsets(self, topic: str) -> dict[int, tuple[int, str | None]]:
        """partition -> (next offset, SHA-256 of the record before it) as stored with the projections."""
        try:
            async with self._pool.acquire() as conn:
                return {r["partition"]: (r["next_offset"], r["last_sha256"])
                        for r in await conn.fetch(query("load_offsets"), self._group_id, topic)}
        except Exception as e:
            raise StoreUnavailable(f"cannot read the stored offsets: {e}") from e

    async def load_offsets_and_trees(self, topic: str) -> tuple[dict[int, tuple[int, str | None]], dict[int, int]]:
        """``load_offsets``, and partition -> the next offset of its current transparency tree (no entry: no tree),
        read in one statement."""
        try:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(query("load_offsets_trees"), self._group_id, topic)
        except Exception as e:
            raise StoreUnavailable(f"cannot read the stored offsets: {e}") from e
        return ({r["partition"]: (r["next_offset"], r["last_sha256"]) for r in rows},
                {r["partition"]: r["tree_offset"] for r in rows if r["tree_offset"] is not None})

    async def apply_batch(self, records: Sequence[LogRecord | Decoded], *, route: Route | None = None) -> BatchResult:
        """Apply ``records`` (decoded already, or not) in one transaction (in parts, if PostgreSQL refuses one).

        Raises StoreUnavailable (transient), or a permanent error only when not even the dead letter of
        the record that causes a failure can be written (then nothing is). With ``route``, a record whose
        predecessor is not projected yet is handed back for retry (until ``max_attempts``),
        and copies of retries and dead letters go to the outbox; without it (rebuilds,
        replays, tests), such a record is parked instead.
        """
        try:
            async with self._pool.acquire() as conn:
                return await self.apply_on(conn, records, route=route)
        except StoreUnavailable:
            raise
        except Exception as e:
            error = database_error(e, f"batch of {len(records)} records not applied")
            if isinstance(error, StoreUnavailable):
                raise error from e
            raise

    async def apply_on(self, conn: asyncpg.Connection, records: Sequence[LogRecord | Decoded], *,
                       route: Route | None = None) -> BatchResult:
        """``apply_batch`` on ``conn``: its own transactions, or savepoints inside the caller's. The result counts
        them (``BatchResult.transactions``)."""
        begun = self.transactions
        result = await self._isolating(conn, decoded(records), route)  # decoded once: the halves reuse it
        result.transactions = self.transactions - begun
        return result

    async def _isolating(self, conn: asyncpg.Connection, records: list[Decoded], route: Route | None) -> BatchResult:
        """Apply ``records``, in halves down to the record that PostgreSQL refuses, if it refuses one."""
        try:
            return await self._attempt(conn, records, route)
        except _ISOLATED as e:
            if len(records) > 1:
                log.warning("a batch of %d records failed (%s: %s); applying it in halves", len(records), e.code, e)
                half = len(records) // 2
                first = await self._isolating(conn, records[:half], route)
                return first.merge(await self._isolating(conn, records[half:], route))
            return await self._apply_alone(conn, records[0], route, e)

    async def _apply_alone(self, conn: asyncpg.Connection, item: Decoded, route: Route | None,
                           refusal: PermanentError) -> BatchResult:
        """One record whose batch failed: itself the cause, or an event parked behind it that it lets follow."""
        record = item.record
        try:
            alone = await self._attempt(conn, [item], route, follow_parked=False)
        except _ISOLATED as e:
            log.warning("%s[%d]@%d is dead-lettered as %s: %s", record.topic, record.partition, record.offset,
                        e.code, e)
            return await self._attempt(conn, [item], route, refused=e)
        # The record is not the cause: the parked events that it unblocks are. Each is a record of its own now.
        streams = sorted({stream for stream, _ in alone.projected})
        parked = sorted(await conn.fetch(query("load_parked"), streams), key=lambda r: (r["stream_id"], r["seq"]))
        if not parked:
            return alone  # refused once, accepted now: nothing to isolate
        log.warning("%s[%d]@%d failed with the %d events parked behind it, and not alone (%s): applying those on "
                    "their own", record.topic, record.partition, record.offset, len(parked), refusal)
        followers = [_parked_record(r, attempts=1) for r in parked]
        return alone.merge(await self._isolating(conn, decoded(followers), route))

    async def _attempt(self, conn: asyncpg.Connection, records: Sequence[Decoded], route: Route | None, *,
                       follow_parked: bool = True, refused: PermanentError | None = None) -> BatchResult:
        waits = LockWaits()  # over the tries
        for tries in range(1, _CONFLICT_TRIES + 1):
            self.transactions += 1
            try:
                async with conn.transaction():
                    # Shared: batches run side by side; `runledger rebuild` takes it exclusively to switch over.
                    with waits.timing():
                        await conn.execute(query("apply_lock"))
                    result = await self._run(conn, records, route, Policy(
                        self.max_attempts, route is not None, follow_parked, refused), waits)
                    if self._after_locks is not None:
                        await self._after_locks()
                    if result.projected or result.dead:
                        await conn.execute(query("notify_projected"))  # wakes `runledger wait`, on commit
                result.lock_wait_s = waits.seconds
                return result
            except Exception as e:
                error = database_error(e, f"batch of {len(records)} records not applied")
                if error is None:
                    log.exception("a batch of %d records failed in runledger's own code", len(records))
                    error = ProcessingFailed(pg_text(f"{type(e).__name__}: {e}"))
                if isinstance(error, StoreLockTimeout):
                    error.waited_s = waits.seconds
                elif isinstance(error, StoreConflict) and tries < _CONFLICT_TRIES:
                    await asyncio.sleep(0.05 * tries * (0.5 + random.random()))  # noqa: S311 - jitter
                    continue
                if isinstance(e, asyncpg.UniqueViolationError):
                    error = RejectedByDatabase(pg_text(f"SQLSTATE {e.sqlstate} after {tries} tries: {e}"))
                raise error from e
        raise AssertionError("unreachable")

    async def _run(self, conn: asyncpg.Connection, records: Sequence[Decoded], route: Route | None,
                   policy: Policy, waits: LockWaits) -> BatchResult:
        planner = BatchPlanner(self.catalog, policy, datetime.now(UTC))
        planner.add(records)
        loaded = Loaded()
        if streams := planner.streams:
            with waits.timing():
                await conn.fetchval(query("lock_streams"), streams)
            loaded = await _load(conn, streams, planner.event_ids, follow_parked=policy.follow_parked)
        plan = planner.plan(loaded)
        await _write(conn, plan, route, self._group_id, waits)
        return plan.result

    async def apply_until_done(self, records: Sequence[LogRecord]) -> BatchResult:
        """``apply_batch``, retried with backoff while PostgreSQL is unavailable: nothing is skipped."""
        pause = 0.1
        while True:
            try:
                return await self.apply_batch(records)
            except StoreUnavailable as e:
                log.warning("%s; retrying in %.1f s", e, pause)
                await asyncio.sleep(pause * (0.5 + random.random()))  # noqa: S311 - jitter
                pause = min(pause * 2, 5.0)


async def _load(conn: asyncpg.Connection, streams: list[str], event_ids: list[str], *,
                follow_parked: bool) -> Loaded:
    """What the planner needs of ``streams``, read under their locks."""
    heads = {r["stream_id"]: Head(r["seq"], r["hash"]) for r in await conn.fetch(query("load_heads"), streams)}
    states = _load_states(await conn.fetch(query("load_executions"), streams),
                          await conn.fetch(query("load_steps"), streams))
    blocked = {r["stream_id"] for r in await conn.fetch(query("open_dead_streams"), streams)}
    parked = [Parked(r["stream_id"], r["seq"], r["event_id"], _parked_record(r))
              for r in await conn.fetch(query("load_parked"), streams)] if follow_parked else []
    projected = {r["event_id"]: ProjectedEvent(r["stream_id"], r["seq"], r["hash"]) for r in await conn.fetch(
        query("load_projected_ids"), [*event_ids, *(p.event_id for p in parked)])}
    return Loaded(heads, states, projected, blocked, parked)


def _parked_record(row: asyncpg.Record, attempts: int = 0) -> LogRecord:
    return LogRecord(row["kafka_topic"], row["kafka_partition"], row["kafka_offset"], row["stream_id"].encode(),
                     bytes(row["value"]), attempts=attempts)


async def _write(conn: asyncpg.Connection, plan: Plan, route: Route | None, group_id: str,
                 waits: LockWaits) -> None:
    """Write ``plan``; ``plan.result.rows`` counts the rows written per table, leaving out tables not changed."""
    if plan.executions:
        await conn.execute(query("upsert_executions"), *_columns(plan.executions))
        await conn.execute(query("upsert_heads"), *_columns(plan.heads))
    if plan.steps:
        await conn.execute(query("upsert_steps"), *_columns(plan.steps))
    if plan.costs:
        await conn.copy_records_to_table("costs", records=plan.costs, columns=COST_COLUMNS)
    if plan.artifacts:
        await conn.execute(query("upsert_artifacts"), *_columns(plan.artifacts))
    if plan.parks:
        await conn.executemany(query("park"), plan.parks)
    if plan.unparks:
        await conn.executemany(query("unpark"), plan.unparks)
    result = plan.result
    result.rows = Counter(plan.counts())
    await _write_dead_letters(conn, result)
    if route is not None and (result.retry or result.dead):
        copies = route(result.retry, result.dead)
        await conn.executemany(query("insert_outbox"), copies)
        result.rows["outbox"] = len(copies)
    if plan.offsets:
        await conn.executemany(query("save_offset"), [(group_id, *o) for o in plan.offsets])
    if plan.audit or plan.fresh:  # last: the locks of the partitions' trees are held until commit
        await _append_audit(conn, plan, waits)
    result.rows = Counter({table: n for table, n in result.rows.items() if n})


async def _append_audit(conn: asyncpg.Connection, plan: Plan, waits: LockWaits) -> None:
    """The leaves of the records read from the log now, and the audit rows, each with its leaf."""
    positions = [(row[_AUDIT_TOPIC], row[_AUDIT_PARTITION], row[_AUDIT_OFFSET]) for row in plan.audit]
    leaves = await grow(conn, plan.fresh, positions, waits)
    if plan.audit:
        await conn.copy_records_to_table(
            "audit_log", records=[(*row, *leaves.get(at, (None, None))) for row, at in zip(plan.audit, positions,
                                                                                         strict=True)],
            columns=(*AUDIT_COLUMNS, "tree", "leaf_index"))


def _columns(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows as one tuple per column: the arrays a set-based statement unnests."""
    return list(zip(*rows, strict=True))


async def _write_dead_letters(conn: asyncpg.Connection, result: BatchResult) -> None:
    recorded = []
    for f in result.dead:
        r = f.record
        if r.dead_letter_id is not None:  # a replay that failed again: same letter, one more attempt
            await conn.execute(query("dead_letter_failed_again"), r.dead_letter_id, f.error.code, f.message,
                               f.failed_at)
            recorded.append(replace(f, dead_letter_id=r.dead_letter_id))
            continue
        letter = await conn.fetchval(
            query("insert_dead_letter"), f.error.code, f.message, f.attempts, f.first_failed, f.failed_at,
            r.topic, r.partition, r.offset, r.key, r.value, f.stream_id, f.seq, f.event_id, f.event_type,
            f.claimed_stream_id)
        if letter is not None:  # None: this record already has an open letter
            recorded.append(replace(f, dead_letter_id=letter))
            result.rows["dead_letters"] += 1
    result.dead = recorded


def _load_states(executions: list[asyncpg.Record], steps: list[asyncpg.Record]) -> dict[str, ExecutionState]:
    states = {
        r["stream_id"]: ExecutionState(
            stream_id=r["stream_id"], workflow=r["workflow"], status=r["status"], started_at=r["started_at"],
            last_seq=r["last_seq"], last_hash=r["last_hash"], agent_id=r["agent_id"], customer_id=r["customer_id"],
            ended_at=r["ended_at"], budget_usd=r["budget_usd"], input_tokens=r["input_tokens"],
            output_tokens=r["output_tokens"], cached_tokens=r["cached_tokens"], cost_usd=r["cost_usd"],
            unpriced_costs=r["unpriced_costs"], error=r["error"])
        for r in executions
    }
    for r in steps:
        states[r["stream_id"]].steps[r["step_id"]] = StepState(
            r["step_id"], r["status"], r["name"], r["step_order"], r["attempts"], r["started_at"], r["ended_at"],
            r["error"], r["cost_usd"])
    return states
