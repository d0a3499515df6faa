"""The PostgreSQL side of projection: migrations, price catalogs, and applying a batch of records.

``ProjectionStore.apply_batch`` runs the rules of ``projections.rules`` over a
batch of log records and writes, in one transaction, the projection rows, the
audit rows, the stream heads, the dead letters and the Kafka offsets, so that a
batch is applied entirely or not at all, and applying it again changes nothing.

Every record ends in one outcome (SPEC.md section 6): projected, duplicate,
parked behind a dead-lettered predecessor, dead-lettered (a permanent failure,
or retries exhausted), or handed back for retry (its predecessor is not
projected yet). Records that leave the batch are given to a ``Forward``
callback inside the transaction, so they are safe in Kafka before the offsets
that pass them are committed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from projections.pricing import ModelPrice, PriceCatalog
from projections.rules import ExecutionState, Projected, StepState, apply
from projections.sql import migrations, query, quote_schema
from schemas.chain import Head, link_error
from schemas.errors import (
    ChainBroken,
    PermanentError,
    PredecessorMissing,
    RetriesExhausted,
    RunledgerError,
    SeqConflict,
    TransientError,
)
from schemas.events import Event, decode_json, parse_event

__all__ = ["NOTIFY_CHANNEL", "BatchResult", "DeadLetterCopy", "Failure", "Forward", "LogRecord", "ProjectionStore",
           "StoreConflict", "StoreTimeout", "StoreUnavailable", "connect", "connect_one", "migrate"]

log = logging.getLogger(__name__)

WORKER_ROLE = "runledger_worker"
NOTIFY_CHANNEL = "runledger_projected"


class StoreUnavailable(TransientError):
    """PostgreSQL is unreachable or went away mid-transaction. Retry."""

    code = "database_unavailable"


class StoreConflict(StoreUnavailable):
    """The transaction lost a deadlock or a serialization check against another one. Retry."""

    code = "database_conflict"


class StoreTimeout(StoreUnavailable):
    """PostgreSQL did not answer in time. Retry."""

    code = "database_timeout"


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One record: where it was read from the log, its bytes, and its failed deliveries so far.

    A record from a retry topic keeps its original log position; ``attempts`` counts
    the deliveries that failed, ``first_failed`` when the first did. A record being
    replayed from the dead letters carries its letter's ``dead_letter_id``.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    attempts: int = 0
    first_failed: datetime | None = None
    dead_letter_id: int | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """A record that leaves the batch unprojected, with what is known of its event."""

    record: LogRecord
    error: RunledgerError
    failed_at: datetime
    stream_id: str | None = None
    seq: int | None = None
    event_id: str | None = None
    event_type: str | None = None
    dead_letter_id: int | None = None  # set once the letter row exists

    @property
    def attempts(self) -> int:
        return self.record.attempts + 1

    @property
    def first_failed(self) -> datetime:
        return self.record.first_failed or self.failed_at


DeadLetterCopy = tuple[str, int, int]
"""(topic, partition, offset) of a dead letter's copy in the dead-letter topic."""

Forward = Callable[[list[Failure], list[Failure]], Awaitable[dict[int, DeadLetterCopy]]]
"""Sends (to retry, dead letters) to Kafka and returns once they are safe there: letter id -> its copy."""


@dataclass(slots=True)
class BatchResult:
    """What a batch did: the events projected, counts by outcome, what left it, and rows written per table."""

    projected: list[tuple[str, int]] = field(default_factory=list)
    duplicates: int = 0
    parked: int = 0
    dead: list[Failure] = field(default_factory=list)
    retry: list[Failure] = field(default_factory=list)
    rows: Counter[str] = field(default_factory=Counter)
    cost_usd: Decimal = Decimal(0)

    @property
    def rejected(self) -> Counter[str]:
        """Dead letters by reason code."""
        return Counter(f.error.code for f in self.dead)


_TRANSIENT_PG = (asyncpg.PostgresConnectionError, asyncpg.SerializationError, asyncpg.DeadlockDetectedError,
                 asyncpg.UniqueViolationError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
                 asyncpg.QueryCanceledError, asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError,
                 ConnectionError, OSError, TimeoutError)


def _unavailable(e: BaseException, what: str) -> StoreUnavailable:
    """The transient store error for a PostgreSQL or network failure."""
    if isinstance(e, asyncpg.SerializationError | asyncpg.DeadlockDetectedError | asyncpg.UniqueViolationError):
        return StoreConflict(f"{what}: {e}")
    if isinstance(e, TimeoutError | asyncpg.QueryCanceledError):
        return StoreTimeout(f"{what}: timed out ({e or type(e).__name__})")
    return StoreUnavailable(f"{what}: {e or type(e).__name__}")


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Binary jsonb (a version byte, then the text) so that COPY can carry it too.
    await conn.set_type_codec("jsonb", schema="pg_catalog", format="binary",
                              encoder=lambda v: b"\x01" + orjson.dumps(v), decoder=lambda b: orjson.loads(b[1:]))


async def connect(database_url: str, schema: str, *, role: str | None = WORKER_ROLE,
                  min_size: int = 0, max_size: int = 4) -> asyncpg.Pool:
    """A pool whose connections use ``schema`` and act as ``role`` (the worker role by default)."""
    # Startup parameters, not SET: the pool's RESET ALL on release returns to them.
    server_settings = {"search_path": quote_schema(schema)}
    if role is not None:
        server_settings["role"] = role
    try:
        return await asyncpg.create_pool(database_url, min_size=min_size, max_size=max_size, timeout=10,
                                         command_timeout=60, init=_init_connection, server_settings=server_settings)
    except _TRANSIENT_PG as e:
        raise _unavailable(e, "cannot connect to PostgreSQL") from e


async def connect_one(database_url: str, schema: str) -> asyncpg.Connection:
    """One connection on ``schema`` as the connecting user (the owner): for reads, waits and admin work."""
    try:
        return await asyncpg.connect(database_url, server_settings={"search_path": quote_schema(schema)})
    except (OSError, asyncpg.PostgresError) as e:
        raise StoreUnavailable(f"cannot connect to PostgreSQL: {e}") from e


async def migrate(database_url: str, schema: str) -> list[str]:
    """Apply the migrations ``schema`` lacks; safe from several processes at once. Returns what ran."""
    conn = await asyncpg.connect(database_url)
    applied = []
    try:
        quoted = quote_schema(schema)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('runledger.migrate'))")
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
            await conn.execute(f"SET LOCAL search_path TO {quoted}")
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                               "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in migrations():
                if version not in done:
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                                       version, name)
                    applied.append(f"{version:03d}_{name}")
    finally:
        await conn.close()
    return applied


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

    async def load_offsets(self, topic: str) -> dict[int, int]:
        try:
            async with self._pool.acquire() as conn:
                return {r["partition"]: r["next_offset"]
                        for r in await conn.fetch(query("load_offsets"), self._group_id, topic)}
        except _TRANSIENT_PG as e:
            raise _unavailable(e, "cannot read the stored offsets") from e

    async def apply_batch(self, records: Sequence[LogRecord], *, forward: Forward | None = None) -> BatchResult:
        """Apply ``records`` in one transaction. Raises StoreUnavailable (transient) only.

        With ``forward``, a record whose predecessor is not projected yet is handed
        back for retry (until ``max_attempts``), and dead letters get a copy in Kafka;
        without it (rebuilds, replays, tests), such a record is parked instead.
        """
        try:
            async with self._pool.acquire() as conn:
                return await self.apply_on(conn, records, forward=forward)
        except _TRANSIENT_PG as e:
            raise _unavailable(e, f"batch of {len(records)} records not applied") from e

    async def apply_on(self, conn: asyncpg.Connection, records: Sequence[LogRecord], *,
                       forward: Forward | None = None) -> BatchResult:
        """``apply_batch`` on ``conn``: its own transaction, or a savepoint inside the caller's."""
        async with conn.transaction():
            # Shared: batches run side by side; `runledger rebuild` takes it exclusively to switch over.
            await conn.execute(query("apply_lock"))
            batch = _Batch(conn, self.catalog, self._group_id, self.max_attempts, retry_gaps=forward is not None)
            result = await batch.run(records)
            if forward is not None and (result.retry or result.dead):
                copies = await forward(result.retry, result.dead)
                await conn.executemany(query("set_dead_letter_copy"),
                                       [(letter, *copy) for letter, copy in copies.items()])
            if result.projected or result.dead:
                await conn.execute(query("notify_projected"))  # wakes `runledger wait`, on commit
            return result

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

    def __init__(self, conn: asyncpg.Connection, catalog: PriceCatalog, group_id: str, max_attempts: int, *,
                 retry_gaps: bool) -> None:
        self.conn, self.catalog, self.group_id = conn, catalog, group_id
        self.max_attempts, self.retry_gaps = max_attempts, retry_gaps
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
        (self.result.retry if failure.error.transient else self.result.dead).append(failure)

    async def run(self, records: Sequence[LogRecord]) -> BatchResult:
        # Per stream: (event, record, its data as received, or None for an event parked earlier).
        by_stream: dict[str, list[_Item]] = defaultdict(list)
        for record in records:
            raw = None
            try:
                raw = decode_json(record.value)
                event = parse_event(raw)
            except PermanentError as e:
                self.fail(record, e, raw=raw)
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
        for row in await conn.fetch(query("load_parked"), streams):
            record = LogRecord(row["kafka_topic"], row["kafka_partition"], row["kafka_offset"],
                               row["stream_id"].encode(), bytes(row["value"]))
            by_stream[row["stream_id"]].append((parse_event(record.value), record, None))
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
                                data if data is not None else decode_json(record.value)["data"])
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
        ends: dict[tuple[str, int], int] = {}
        for r in records:
            if r.attempts == 0:  # read from the log now; a retried or replayed record is behind these offsets
                key = (r.topic, r.partition)
                ends[key] = max(ends.get(key, 0), r.offset + 1)
        if ends:
            await conn.executemany(query("save_offset"), [(self.group_id, t, p, o) for (t, p), o in ends.items()])
        self.result.rows = Counter({table: n for table, n in rows.items() if n})  # only the tables that change

    async def write_dead_letters(self) -> None:
        recorded = []
        for f in self.result.dead:
            r = f.record
            if r.dead_letter_id is not None:  # a replay that failed again: same letter, one more attempt
                await self.conn.execute(query("dead_letter_failed_again"), r.dead_letter_id, f.error.code,
                                        str(f.error), f.failed_at)
                recorded.append(replace(f, dead_letter_id=r.dead_letter_id))
                continue
            letter = await self.conn.fetchval(
                query("insert_dead_letter"), f.error.code, str(f.error), f.attempts, f.first_failed, f.failed_at,
                r.topic, r.partition, r.offset, r.key, r.value, f.stream_id, f.seq, f.event_id, f.event_type)
            if letter is not None:  # None: this record already has an open letter
                recorded.append(replace(f, dead_letter_id=letter))
                self.result.rows["dead_letters"] += 1
        self.result.dead = recorded


def _known_fields(raw: Any) -> tuple[str | None, int | None, str | None, str | None]:
    """(subject, seq, id, type) of a record that is not a valid event, as far as its JSON has them."""
    if not isinstance(raw, dict):
        return None, None, None, None

    def text(name: str) -> str | None:
        value = raw.get(name)
        return value[:200] if isinstance(value, str) else None

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
