"""Applying a batch of log records to the projection tables, in one transaction.

``ProjectionStore.apply_batch`` runs the rules of ``runledger.projections.rules`` over a
batch of log records and writes, in one transaction, the projection rows, the
audit rows, the stream heads, the dead letters, the outbox and the Kafka
offsets, so that a batch is applied entirely or not at all, and applying it
again changes nothing.

Every record ends in one outcome (SPEC.md section 6): projected, duplicate,
parked behind a dead-lettered predecessor, dead-lettered (a permanent failure,
retries exhausted, or data PostgreSQL refuses), or handed back for retry (its
predecessor is not projected yet). Copies of what leaves the batch for the
retry topics or the dead-letter topic are rows of ``outbox`` in the same
transaction; they are published after it commits (``runledger.streams.worker.outbox``).

A batch that PostgreSQL refuses is split in halves, and each half applied on
its own, until the record that causes the refusal stands alone: it alone is
dead-lettered as ``rejected_by_database``, and the rest is projected.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg

from runledger.projections.postgres.db import RejectedByDatabase, StoreConflict, StoreUnavailable, database_error
from runledger.projections.postgres.queries import query
from runledger.projections.pricing import ModelPrice, PriceCatalog
from runledger.projections.records import BatchResult, Failure, LogRecord, Route, pg_text
from runledger.projections.rules import ExecutionState, Projected, StepState, apply
from runledger.schemas.chain import Head, link_error
from runledger.schemas.errors import (
    ChainBroken,
    PermanentError,
    PredecessorMissing,
    RetriesExhausted,
    RunledgerError,
    SeqConflict,
)
from runledger.schemas.events import MAX_EVENT_BYTES, Event, decode_event, decode_json, parse_event

__all__ = ["ProcessingFailed", "ProjectionStore"]

log = logging.getLogger(__name__)


class ProcessingFailed(PermanentError):
    """runledger's own code failed on this record alone (a bug): it is dead-lettered as it is, to be replayed
    once the code is fixed, instead of stopping every stream behind it."""

    code = "processing_failed"


# Failures that the record causes, found by applying the batch in halves.
_ISOLATED = (RejectedByDatabase, ProcessingFailed)
# A record larger than this cannot travel through a retry topic (its copy adds headers): it is dead-lettered.
_RETRY_BYTES = MAX_EVENT_BYTES + 64 * 1024

# A unique-key race with another transaction is retried in place this often before the record is taken
# for one PostgreSQL refuses (the per-stream locks make a real race rare).
_CONFLICT_TRIES = 3


class ProjectionStore:
    """Applies batches of log records to the projection tables of one schema.

    ``max_attempts`` is how many deliveries a record gets before a transient failure
    becomes the dead letter ``retries_exhausted`` (1 + the retry topics' count).
    """

    def __init__(self, pool: asyncpg.Pool, catalog: PriceCatalog, group_id: str, *, max_attempts: int = 6) -> None:
        self._pool = pool
        self.catalog = catalog
        self._group_id = group_id
        self.max_attempts = max_attempts

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

    async def apply_batch(self, records: Sequence[LogRecord], *, route: Route | None = None) -> BatchResult:
        """Apply ``records`` in one transaction (in parts, if PostgreSQL refuses one of them).

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

    async def apply_on(self, conn: asyncpg.Connection, records: Sequence[LogRecord], *,
                       route: Route | None = None) -> BatchResult:
        """``apply_batch`` on ``conn``: its own transactions, or savepoints inside the caller's."""
        try:
            return await self._attempt(conn, records, route)
        except _ISOLATED as e:
            if len(records) > 1:
                log.warning("a batch of %d records failed (%s: %s); applying it in halves", len(records), e.code, e)
                half = len(records) // 2
                first = await self.apply_on(conn, records[:half], route=route)
                return first.merge(await self.apply_on(conn, records[half:], route=route))
            return await self._apply_alone(conn, records[0], route, e)

    async def _apply_alone(self, conn: asyncpg.Connection, record: LogRecord, route: Route | None,
                           refusal: PermanentError) -> BatchResult:
        """One record whose batch failed: itself the cause, or an event parked behind it that it lets follow."""
        try:
            alone = await self._attempt(conn, [record], route, follow_parked=False)
        except _ISOLATED as e:
            log.warning("%s[%d]@%d is dead-lettered as %s: %s", record.topic, record.partition, record.offset,
                        e.code, e)
            return await self._attempt(conn, [record], route, refused=e)
        # The record is not the cause: the parked events that it unblocks are. Each is a record of its own now.
        streams = sorted({stream for stream, _ in alone.projected})
        parked = sorted(await conn.fetch(query("load_parked"), streams), key=lambda r: (r["stream_id"], r["seq"]))
        if not parked:
            return alone  # refused once, accepted now: nothing to isolate
        log.warning("%s[%d]@%d failed with the %d events parked behind it, and not alone (%s): applying those on "
                    "their own", record.topic, record.partition, record.offset, len(parked), refusal)
        followers = [LogRecord(r["kafka_topic"], r["kafka_partition"], r["kafka_offset"], r["stream_id"].encode(),
                               bytes(r["value"]), attempts=1) for r in parked]
        return alone.merge(await self.apply_on(conn, followers, route=route))

    async def _attempt(self, conn: asyncpg.Connection, records: Sequence[LogRecord], route: Route | None, *,
                       follow_parked: bool = True, refused: PermanentError | None = None) -> BatchResult:
        for tries in range(1, _CONFLICT_TRIES + 1):
            try:
                async with conn.transaction():
                    # Shared: batches run side by side; `runledger rebuild` takes it exclusively to switch over.
                    await conn.execute(query("apply_lock"))
                    batch = _Batch(conn, self.catalog, self._group_id, self.max_attempts, route,
                                   follow_parked=follow_parked, refused=refused)
                    result = await batch.run(records)
                    if result.projected or result.dead:
                        await conn.execute(query("notify_projected"))  # wakes `runledger wait`, on commit
                    return result
            except Exception as e:
                error = database_error(e, f"batch of {len(records)} records not applied")
                if error is None:
                    log.exception("a batch of %d records failed in runledger's own code", len(records))
                    error = ProcessingFailed(pg_text(f"{type(e).__name__}: {e}"))
                if isinstance(error, StoreConflict) and tries < _CONFLICT_TRIES:
                    await asyncio.sleep(0.05 * tries * (0.5 + random.random()))  # noqa: S311 - jitter
                    continue
                if isinstance(e, asyncpg.UniqueViolationError):
                    error = RejectedByDatabase(pg_text(f"SQLSTATE {e.sqlstate} after {tries} tries: {e}"))
                raise error from e
        raise AssertionError("unreachable")

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


_Item = tuple[Event, LogRecord, dict[str, Any] | None]


class _Batch:
    """One transaction's work; see ``ProjectionStore.apply_batch``."""

    def __init__(self, conn: asyncpg.Connection, catalog: PriceCatalog, group_id: str, max_attempts: int,
                 route: Route | None, *, follow_parked: bool, refused: PermanentError | None) -> None:
        self.conn, self.catalog, self.group_id = conn, catalog, group_id
        self.max_attempts, self.route = max_attempts, route
        self.retry_gaps = route is not None
        self.follow_parked, self.refused = follow_parked, refused
        self.now = datetime.now(UTC)
        self.result = BatchResult()
        self.blocked: set[str] = set()  # streams with a dead letter: later events park behind it
        self.parks: list[tuple[Any, ...]] = []
        self.unparks: list[tuple[Any, ...]] = []
        self.audit: list[tuple[Any, ...]] = []
        self.costs: list[tuple[Any, ...]] = []
        self.artifacts: list[tuple[Any, ...]] = []
        self.execution_rows: list[tuple[Any, ...]] = []
        self.step_rows: list[tuple[Any, ...]] = []
        self.head_rows: list[tuple[Any, ...]] = []

    def fail(self, record: LogRecord, error: RunledgerError, event: Event | None = None,
             raw: Any = None) -> None:
        """Send ``record`` out of the batch: to retry if ``error`` is transient and attempts remain, else dead."""
        if event is not None:
            known = (event.subject, event.seq, event.id, event.type)
        else:
            known = _known_fields(raw)
        failure = Failure(record, error, self.now, *known)
        if failure.stream_id is not None and not error.transient:
            self.blocked.add(failure.stream_id)
        if error.transient and failure.attempts >= self.max_attempts:
            failure = replace(failure, error=RetriesExhausted(
                f"{failure.attempts} attempts from {failure.first_failed:%Y-%m-%dT%H:%M:%SZ}; last: "
                f"{error.code}: {error}"))
        elif error.transient and len(record.value) + len(record.key or b"") > _RETRY_BYTES:
            failure = replace(failure, error=RetriesExhausted(
                f"a record of {len(record.value) + len(record.key or b''):,} bytes cannot travel through a retry "
                f"topic; {error.code}: {error}"))
        (self.result.retry if failure.error.transient else self.result.dead).append(failure)

    async def run(self, records: Sequence[LogRecord]) -> BatchResult:
        # Per stream: (event, record, its data as received, or None for an event parked earlier).
        by_stream: dict[str, list[_Item]] = defaultdict(list)
        for record in records:
            raw = event = None
            try:
                raw = decode_event(record.value)
                event = parse_event(raw)
            except PermanentError as e:
                if self.refused is None:
                    self.fail(record, e, raw=raw)
                    continue
            if self.refused is not None:  # this record alone, refused by PostgreSQL whatever it is: it leaves
                self.fail(record, self.refused, event, raw=raw)
                if event is not None:  # if it was parked, its letter holds it now
                    self.unparks.append((event.subject, event.seq, event.id))
                continue
            by_stream[event.subject].append((event, record, raw["data"]))
        streams = sorted(by_stream)
        if streams:
            await self.conn.fetchval(query("lock_streams"), streams)
            await self.project_streams(streams, by_stream)
        await self.write(records)
        return self.result

    async def project_streams(self, streams: list[str], by_stream: dict[str, list[_Item]]) -> None:
        conn = self.conn
        heads = {r["stream_id"]: Head(r["seq"], r["hash"]) for r in await conn.fetch(query("load_heads"), streams)}
        states = _load_states(await conn.fetch(query("load_executions"), streams),
                              await conn.fetch(query("load_steps"), streams))
        ids = [e.id for items in by_stream.values() for e, _, _ in items]
        projected_ids = {r["event_id"] for r in await conn.fetch(query("load_projected_ids"), ids)}
        self.blocked.update(r["stream_id"] for r in await conn.fetch(query("open_dead_streams"), streams))
        for row in await conn.fetch(query("load_parked"), streams) if self.follow_parked else ():
            record = LogRecord(row["kafka_topic"], row["kafka_partition"], row["kafka_offset"],
                               row["stream_id"].encode(), bytes(row["value"]))
            try:
                event = parse_event(record.value)
            except PermanentError as e:  # parked under older, looser rules: it leaves the stream now
                self.fail(record, e, raw=_json_or_none(record.value))
                self.unparks.append((row["stream_id"], row["seq"], row["event_id"]))
                continue
            by_stream[row["stream_id"]].append((event, record, None))
        touched: dict[str, set[str]] = defaultdict(set)
        for stream in streams:
            head = heads.get(stream, Head())
            state = states.get(stream)
            pending = sorted(by_stream[stream], key=lambda item: item[0].seq)
            advanced = True
            while pending and advanced:  # parked events may become applicable as the head moves
                advanced, waiting = False, []
                for item in pending:
                    event, record, data = item
                    was_parked = data is None
                    if event.id in projected_ids:
                        self.result.duplicates += not was_parked
                        if was_parked:
                            self.unparks.append((event.subject, event.seq, event.id))
                        continue
                    problem = link_error(head, {"seq": event.seq, "prevhash": event.prevhash})
                    if problem is not None and problem[0] == "seq_gap":
                        waiting.append(item)
                        continue
                    if was_parked:
                        self.unparks.append((event.subject, event.seq, event.id))
                    if problem is not None:
                        error = SeqConflict if problem[0] == "seq_conflict" else ChainBroken
                        self.fail(record, error(f"{stream} seq {event.seq}: {problem[1]}"), event)
                        continue
                    try:
                        done = apply(state, event, self.catalog)
                    except PermanentError as e:
                        self.fail(record, e, event)
                        continue
                    state, head, advanced = done.state, Head(event.seq, event.hash), True
                    projected_ids.add(event.id)
                    self.record(done, event, record,
                                data if data is not None else decode_event(record.value)["data"])
                    touched[stream].update(done.touched_steps)
                pending = waiting
            for event, record, data in pending:
                if data is None:
                    continue  # parked earlier, still waiting
                # Behind a dead letter of its stream it waits for the replay; otherwise its predecessor is
                # still on its way (in a retry topic, say), so it follows through the retry topics.
                if self.retry_gaps and stream not in self.blocked:
                    self.fail(record, PredecessorMissing(
                        f"{stream} seq {event.seq}: seq {head.seq + 1} is not projected yet"), event)
                    continue
                self.result.parked += 1
                self.parks.append((event.subject, event.seq, event.id, record.value, record.topic,
                                   record.partition, record.offset))
            if state is not None and state.last_seq != heads.get(stream, Head()).seq:
                states[stream] = state
                heads[stream] = head
            else:
                touched.pop(stream, None)
        self.execution_rows = [_execution_row(states[s]) for s in touched]
        self.step_rows = [_step_row(s, states[s].steps[step]) for s, steps in touched.items() for step in steps]
        self.head_rows = [(s, heads[s].seq, heads[s].hash) for s in touched]

    def record(self, done: Projected, event: Event, record: LogRecord, data: dict[str, Any]) -> None:
        self.result.projected.append((event.subject, event.seq))
        self.audit.append((event.id, event.subject, event.seq, event.type, event.source, event.specversion,
                           event.datacontenttype, event.dataschema, event.traceparent, event.time,
                           data, event.hash, record.value, event.prevhash, record.topic,
                           record.partition, record.offset, record.attempts + 1))
        self.costs += [(c.event_id, c.stream_id, c.seq, c.step_id, c.provider, c.model, c.input_tokens,
                        c.output_tokens, c.cached_tokens, c.cost_usd, c.cost_source, c.catalog_version,
                        c.occurred_at) for c in done.costs]
        self.artifacts += [(a.stream_id, a.artifact_id, a.step_id, a.type, a.name, a.uri, a.size_bytes,
                            a.content_type, a.created_at, a.seq) for a in done.artifacts]

    async def write(self, records: Sequence[LogRecord]) -> None:
        conn, rows = self.conn, self.result.rows
        if self.execution_rows:
            await conn.executemany(query("upsert_execution"), self.execution_rows)
            await conn.executemany(query("upsert_head"), self.head_rows)
        if self.step_rows:
            await conn.executemany(query("upsert_step"), self.step_rows)
        if self.audit:
            await conn.copy_records_to_table("audit_log", records=self.audit, columns=_AUDIT_COLUMNS)
        if self.costs:
            await conn.copy_records_to_table("costs", records=self.costs, columns=_COST_COLUMNS)
        if self.artifacts:
            await conn.executemany(query("upsert_artifact"), self.artifacts)
        if self.parks:
            await conn.executemany(query("park"), self.parks)
        if self.unparks:
            await conn.executemany(query("unpark"), self.unparks)
        rows.update({"executions": len(self.execution_rows), "stream_heads": len(self.head_rows),
                     "steps": len(self.step_rows),
                     "audit_log": len(self.audit), "costs": len(self.costs), "artifacts": len(self.artifacts),
                     "parked_events": len(self.parks) - len(self.unparks)})
        self.result.cost_usd = sum((c[_COST_USD] for c in self.costs if c[_COST_USD] is not None), Decimal(0))
        await self.write_dead_letters()
        if self.route is not None and (self.result.retry or self.result.dead):
            copies = self.route(self.result.retry, self.result.dead)
            await conn.executemany(query("insert_outbox"), copies)
            rows["outbox"] = len(copies)
        last: dict[tuple[str, int], LogRecord] = {}
        for r in records:
            if r.attempts == 0:  # read from the log now; a retried or replayed record is behind these offsets
                key = (r.topic, r.partition)
                if key not in last or r.offset > last[key].offset:
                    last[key] = r
        if last:
            await conn.executemany(query("save_offset"), [
                (self.group_id, t, p, r.offset + 1, hashlib.sha256(r.value).hexdigest())
                for (t, p), r in last.items()])
        self.result.rows = Counter({table: n for table, n in rows.items() if n})  # only the tables that change

    async def write_dead_letters(self) -> None:
        recorded = []
        for f in self.result.dead:
            r = f.record
            if r.dead_letter_id is not None:  # a replay that failed again: same letter, one more attempt
                await self.conn.execute(query("dead_letter_failed_again"), r.dead_letter_id, f.error.code,
                                        f.message, f.failed_at)
                recorded.append(replace(f, dead_letter_id=r.dead_letter_id))
                continue
            letter = await self.conn.fetchval(
                query("insert_dead_letter"), f.error.code, f.message, f.attempts, f.first_failed, f.failed_at,
                r.topic, r.partition, r.offset, r.key, r.value, f.stream_id, f.seq, f.event_id, f.event_type)
            if letter is not None:  # None: this record already has an open letter
                recorded.append(replace(f, dead_letter_id=letter))
                self.result.rows["dead_letters"] += 1
        self.result.dead = recorded


def _json_or_none(value: bytes) -> Any:
    try:
        return decode_json(value)
    except PermanentError:
        return None


def _known_fields(raw: Any) -> tuple[str | None, int | None, str | None, str | None]:
    """(subject, seq, id, type) of a record that is not a valid event, as far as its JSON has them."""
    if not isinstance(raw, dict):
        return None, None, None, None

    def text(name: str) -> str | None:
        value = raw.get(name)
        return pg_text(value, 200) if isinstance(value, str) else None

    seq = raw.get("seq")
    return text("subject"), seq if type(seq) is int and 0 < seq < 2**63 else None, text("id"), text("type")


_AUDIT_COLUMNS = ["event_id", "stream_id", "seq", "type", "source", "specversion", "datacontenttype", "dataschema",
                  "traceparent", "time", "data", "hash", "raw", "prevhash", "kafka_topic", "kafka_partition",
                  "kafka_offset", "attempts"]
_COST_COLUMNS = ["event_id", "stream_id", "seq", "step_id", "provider", "model", "input_tokens", "output_tokens",
                 "cached_tokens", "cost_usd", "cost_source", "catalog_version", "occurred_at"]
_COST_USD = _COST_COLUMNS.index("cost_usd")


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


def _execution_row(s: ExecutionState) -> tuple[Any, ...]:
    counts = s.step_counts()
    return (s.stream_id, s.workflow, s.agent_id, s.customer_id, s.status, s.started_at, s.ended_at, s.duration_ms,
            len(s.steps), counts["running"], counts["retrying"], counts["completed"], counts["failed"],
            counts["skipped"], s.input_tokens, s.output_tokens, s.cached_tokens, s.cost_usd, s.unpriced_costs,
            s.budget_usd, s.error, s.last_seq, s.last_hash)


def _step_row(stream: str, s: StepState) -> tuple[Any, ...]:
    return (stream, s.step_id, s.name, s.order, s.status, s.attempts, s.started_at, s.ended_at, s.error,
            s.cost_usd or Decimal(0))
