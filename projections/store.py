"""The PostgreSQL side of projection: migrations, price catalogs, and applying a batch of records.

``ProjectionStore.apply_batch`` runs the rules of ``projections.rules`` over a
batch of log records and writes, in one transaction, the projection rows, the
audit rows, the stream heads and the Kafka offsets, so that a batch is applied
entirely or not at all, and applying it again changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from projections.pricing import ModelPrice, PriceCatalog
from projections.rules import ExecutionState, Projected, StepState, apply
from projections.sql import migrations, query, quote_schema
from schemas.chain import Head, link_error
from schemas.errors import ChainBroken, PermanentError, SeqConflict, TransientError
from schemas.events import Event, decode_json, parse_event

__all__ = ["NOTIFY_CHANNEL", "BatchResult", "LogRecord", "ProjectionStore", "StoreUnavailable", "connect", "connect_one", "migrate"]

log = logging.getLogger(__name__)

WORKER_ROLE = "runledger_worker"
NOTIFY_CHANNEL = "runledger_projected"


class StoreUnavailable(TransientError):
    """PostgreSQL is unreachable, or the transaction hit a deadlock or serialization failure. Retry."""

    code = "database_unavailable"


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One record as read from the log: where it was, and its bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


@dataclass(slots=True)
class BatchResult:
    """What a batch did: counts by outcome, rejections by reason, and the events projected."""

    projected: list[tuple[str, int]] = field(default_factory=list)
    duplicates: int = 0
    parked: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


_TRANSIENT_PG = (asyncpg.PostgresConnectionError, asyncpg.SerializationError, asyncpg.DeadlockDetectedError,
                 asyncpg.UniqueViolationError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
                 ConnectionError, OSError, TimeoutError)


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Binary jsonb (a version byte, then the text) so that COPY can carry it too.
    await conn.set_type_codec("jsonb", schema="pg_catalog", format="binary",
                              encoder=lambda v: b"\x01" + orjson.dumps(v), decoder=lambda b: orjson.loads(b[1:]))


async def connect(database_url: str, schema: str, *, role: str | None = WORKER_ROLE,
                  min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    """A pool whose connections use ``schema`` and act as ``role`` (the worker role by default)."""
    # Startup parameters, not SET: the pool's RESET ALL on release returns to them.
    server_settings = {"search_path": quote_schema(schema)}
    if role is not None:
        server_settings["role"] = role
    try:
        return await asyncpg.create_pool(database_url, min_size=min_size, max_size=max_size,
                                         init=_init_connection, server_settings=server_settings)
    except _TRANSIENT_PG as e:
        raise StoreUnavailable(f"cannot connect to PostgreSQL: {e}") from e


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
    """Applies batches of log records to the projection tables of one schema."""

    def __init__(self, pool: asyncpg.Pool, catalog: PriceCatalog, group_id: str) -> None:
        self._pool = pool
        self.catalog = catalog
        self._group_id = group_id

    @staticmethod
    async def save_catalog(pool: asyncpg.Pool, catalog: PriceCatalog) -> None:
        """Store a catalog version (once; a version never changes)."""
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(query("insert_catalog"), catalog.version, catalog.source, len(catalog.prices))
            await conn.executemany(query("insert_price"), [
                (catalog.version, p.model, p.provider, p.input, p.output, p.cached)
                for p in catalog.prices.values()])

    @staticmethod
    async def load_catalog(pool: asyncpg.Pool) -> PriceCatalog | None:
        """The newest catalog version stored, or None."""
        async with pool.acquire() as conn:
            version = await conn.fetchval(query("current_catalog"))
            if version is None:
                return None
            rows = await conn.fetch(query("load_prices"), version)
        return PriceCatalog(version, "database", {
            r["model"]: ModelPrice(r["model"], r["provider"], r["input_usd_per_token"], r["output_usd_per_token"],
                                   r["cached_usd_per_token"]) for r in rows})

    async def load_offsets(self, topic: str) -> dict[int, int]:
        async with self._pool.acquire() as conn:
            return {r["partition"]: r["next_offset"] for r in await conn.fetch(query("load_offsets"),
                                                                                 self._group_id, topic)}

    async def apply_batch(self, records: Sequence[LogRecord]) -> BatchResult:
        """Apply ``records`` in one transaction. Raises StoreUnavailable (transient) only."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                # Shared: batches run side by side; `runledger rebuild` takes it exclusively to switch over.
                await conn.execute(query("apply_lock"))
                result = await _Batch(conn, self.catalog, self._group_id).run(records)
                if result.projected or result.rejected:
                    await conn.execute(query("notify_projected"))  # wakes `runledger wait`, on commit
                return result
        except _TRANSIENT_PG as e:
            raise StoreUnavailable(f"batch of {len(records)} records not applied: {e}") from e


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

    def __init__(self, conn: asyncpg.Connection, catalog: PriceCatalog, group_id: str) -> None:
        self.conn, self.catalog, self.group_id = conn, catalog, group_id
        self.result = BatchResult()
        self.rejects: list[tuple[Any, ...]] = []
        self.parks: list[tuple[Any, ...]] = []
        self.unparks: list[tuple[Any, ...]] = []
        self.audit: list[tuple[Any, ...]] = []
        self.costs: list[tuple[Any, ...]] = []
        self.artifacts: list[tuple[Any, ...]] = []
        self.execution_rows: list[tuple[Any, ...]] = []
        self.step_rows: list[tuple[Any, ...]] = []
        self.head_rows: list[tuple[Any, ...]] = []

    def reject(self, record: LogRecord, error: PermanentError, event: Event | None = None) -> None:
        self.result.rejected[error.code] += 1
        self.rejects.append((error.code, str(error), event.subject if event else None, event.seq if event else None,
                             event.id if event else None, record.topic, record.partition, record.offset,
                             record.key, record.value))

    async def run(self, records: Sequence[LogRecord]) -> BatchResult:
        # Per stream: (event, record, its data as received, or None for an event parked earlier).
        by_stream: dict[str, list[_Item]] = defaultdict(list)
        for record in records:
            try:
                raw = decode_json(record.value)
                event = parse_event(raw)
            except PermanentError as e:
                self.reject(record, e)
                continue
            by_stream[event.subject].append((event, record, raw["data"]))
        streams = sorted(by_stream)
        if streams:
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
                        self.reject(record, error(f"{stream} seq {event.seq}: {problem[1]}"), event)
                        continue
                    try:
                        done = apply(state, event, self.catalog)
                    except PermanentError as e:
                        self.reject(record, e, event)
                        continue
                    state, head, advanced = done.state, Head(event.seq, event.hash), True
                    projected_ids.add(event.id)
                    self.record(done, event, record,
                                data if data is not None else decode_json(record.value)["data"])
                    touched[stream].update(done.touched_steps)
                pending = waiting
            for event, record, data in pending:
                if data is not None:
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
                           record.partition, record.offset))
        self.costs += [(c.event_id, c.stream_id, c.seq, c.step_id, c.provider, c.model, c.input_tokens,
                        c.output_tokens, c.cached_tokens, c.cost_usd, c.cost_source, c.catalog_version,
                        c.occurred_at) for c in done.costs]
        self.artifacts += [(a.stream_id, a.artifact_id, a.step_id, a.type, a.name, a.uri, a.size_bytes,
                            a.content_type, a.created_at, a.seq) for a in done.artifacts]

    async def write(self, records: Sequence[LogRecord]) -> None:
        conn = self.conn
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
        if self.rejects:
            await conn.executemany(query("reject"), self.rejects)
        ends: dict[tuple[str, int], int] = {}
        for r in records:
            key = (r.topic, r.partition)
            ends[key] = max(ends.get(key, 0), r.offset + 1)
        if ends:
            await conn.executemany(query("save_offset"), [(self.group_id, t, p, o) for (t, p), o in ends.items()])


_AUDIT_COLUMNS = ["event_id", "stream_id", "seq", "type", "source", "specversion", "datacontenttype", "dataschema",
                  "traceparent", "time", "data", "hash", "raw", "prevhash", "kafka_topic", "kafka_partition",
                  "kafka_offset"]
_COST_COLUMNS = ["event_id", "stream_id", "seq", "step_id", "provider", "model", "input_tokens", "output_tokens",
                 "cached_tokens", "cost_usd", "cost_source", "catalog_version", "occurred_at"]


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
