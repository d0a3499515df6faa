"""What a worker does with a batch (SPEC.md section 6), and the Kafka side of retries and dead letters.

``RetrySchedule.route`` turns what leaves a batch into outbox rows (the retry
topic one step along the schedule, or the dead-letter topic), which the store
writes in the batch's transaction; ``Forwarder.publish`` sends the outbox to Kafka
after the commit, on a connection of its own, and deletes what Kafka acknowledged.
So the topics never hold a copy whose batch rolled back, and no transaction, lock
or shared connection is held across a broker round trip (rows are claimed for a
while instead). A crash between commit and publish, or between publish and delete,
leaves rows that a later ``publish`` of any worker sends: a copy may arrive twice,
never not at all (dead-letter copies carry their letter id).

``BatchHandler.handle`` applies a batch and, when PostgreSQL is unavailable,
sends the whole batch one step along the retry schedule straight to Kafka (there
is no transaction to write an outbox in) instead of blocking every stream
behind it. Records that have used up the schedule while PostgreSQL is still
down stay where they are and are tried again in place: their dead letter needs
the database, and an outage is not the event's fault. A lock held by another
transaction past ``lock_timeout`` is no outage: the batch is tried again in place.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from runledger.projections.planner import Decoded, as_record
from runledger.projections.postgres.db import StoreLockTimeout, StoreUnavailable
from runledger.projections.postgres.queries import query
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.records import BatchResult, Failure, LogRecord, letter_stream
from runledger.schemas.errors import TransientError
from runledger.schemas.events import MAX_EVENT_BYTES
from runledger.streams import metrics
from runledger.streams.worker.retry import HEADER, RetrySchedule, delay_name, dlq_topic, failure_headers

__all__ = ["BatchHandler", "Forwarder"]

log = logging.getLogger(__name__)

_SEND_TIMEOUT_S = 30.0
_CLAIM_S = 2 * _SEND_TIMEOUT_S + 5  # a claim outlasts the slowest publish that succeeds
_KEY_BYTES = 1024  # a longer key of a dead letter's reference copy is replaced by its SHA-256


class Forwarder:
    """Publishes the outbox to the retry topics and the dead-letter topic, and forwards whole batches while
    PostgreSQL is down."""

    def __init__(self, kafka: Mapping[str, Any], schedule: RetrySchedule, schema: str, *,
                 claim_s: float = _CLAIM_S) -> None:
        self.schedule = schedule
        self.claim_s = claim_s  # how long a publisher holds the outbox rows it claimed
        self.dlq_topic = dlq_topic(schedule.prefix)
        self._schema = schema
        # Tansu refuses idempotent producers (InitProducerId); a duplicate here is harmless anyway.
        self._kafka = AIOKafkaProducer(**kafka, acks="all", enable_idempotence=False,
                                       linger_ms=5, max_request_size=2 * MAX_EVENT_BYTES,
                                       request_timeout_ms=int(_SEND_TIMEOUT_S * 1000))

    async def start(self) -> None:
        try:
            await self._kafka.start()
        except KafkaError as e:
            raise TransientError(f"cannot reach Kafka to forward failed records: {e}") from e

    async def stop(self) -> None:
        await self._kafka.stop()

    async def publish(self, pool: asyncpg.Pool, *, limit: int = 500) -> int:
        """Send every outbox row to Kafka, oldest first; returns how many. ``pool``: the publisher's own, not the
        batches' and the heartbeat's.

        No transaction is open, and no connection taken, while copies are on their way: a statement claims the
        rows for ``claim_s`` (a time written in them, not a lock), they are sent, and a short transaction deletes
        those Kafka acknowledged and releases the others. Rows whose publisher died or froze in between are claimed
        again once their claim has run out, and sent again: a copy may arrive twice, never not at all (a retry
        copy of an event already projected is a duplicate, one still failing lands on its open dead letter, a
        dead-letter copy carries its letter id). Raises TransientError if Kafka or PostgreSQL fails; what was not
        acknowledged is left for the next call."""
        sent = 0
        while True:
            try:
                rows = await pool.fetch(query("outbox_claim"), limit, self.claim_s)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
                raise TransientError(f"cannot claim the outbox: {e}") from e
            if not rows:
                return sent
            acked: list[int] = []
            copies: list[tuple[int, str, int, int]] = []
            try:
                await self._send_all(rows, acked, copies)
            except (KafkaError, TimeoutError) as e:
                await self._settle(pool, rows, acked, copies)
                raise TransientError(f"cannot publish the outbox to Kafka: {e or type(e).__name__}") from e
            await self._settle(pool, rows, acked, copies)
            sent += len(rows)
            if len(rows) < limit:
                return sent

    async def _send_all(self, rows: list[asyncpg.Record], acked: list[int],
                        copies: list[tuple[int, str, int, int]]) -> None:
        """Send the rows' copies and wait for every acknowledgement, noting each row acknowledged in ``acked`` and,
        for a dead letter, (letter, topic, partition, offset) of its copy in ``copies``."""
        pending = [(row, await self._send(row, shrink=False)) for row in rows]
        for row, future in pending:
            try:
                meta = await asyncio.wait_for(future, _SEND_TIMEOUT_S)
            except MessageSizeTooLargeError:
                if row["dead_letter_id"] is None:
                    raise
                meta = await asyncio.wait_for(await self._send(row, shrink=True), _SEND_TIMEOUT_S)
            acked.append(row["id"])
            if row["dead_letter_id"] is not None:
                copies.append((row["dead_letter_id"], meta.topic, meta.partition, meta.offset))

    async def _settle(self, pool: asyncpg.Pool, rows: list[asyncpg.Record], acked: list[int],
                      copies: list[tuple[int, str, int, int]]) -> None:
        """Delete the rows Kafka acknowledged (with where each letter's copy is), and release the others."""
        done = set(acked)
        try:
            async with pool.acquire() as conn, conn.transaction():
                if copies:
                    await conn.executemany(query("set_dead_letter_copy"), copies)
                await conn.execute(query("outbox_done"), acked)
                await conn.execute(query("outbox_release"), [r["id"] for r in rows if r["id"] not in done])
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
            raise TransientError(f"cannot mark {len(acked)} outbox rows sent ({e}): they are sent again once their "
                                 "claim runs out") from e

    async def _send(self, row: asyncpg.Record, *, shrink: bool) -> asyncio.Future:  # type: ignore[type-arg]
        value: bytes = bytes(row["value"])
        headers = dict(row["headers"])
        letter = row["dead_letter_id"]
        key = bytes(row["key"]) if row["key"] is not None else None
        # A dead letter's copy never fails for its size (SPEC.md section 6): its row holds the bytes.
        if letter is not None and (shrink or len(value) + len(key or b"") > MAX_EVENT_BYTES):
            if key is not None and len(key) > _KEY_BYTES:
                key = hashlib.sha256(key).hexdigest().encode()
            headers[HEADER + "value_omitted"] = (f"{len(value)} bytes, too large for the topic: the record is in "
                                                 f"dead_letters row {letter} of schema {self._schema} "
                                                 f"(`runledger dlq show {letter}`)")
            value = orjson.dumps({"dead_letter": {"schema": self._schema, "id": letter, "bytes": len(value),
                                                  "sha256": hashlib.sha256(value).hexdigest()}})
        try:
            sent: asyncio.Future[Any] = await self._kafka.send(
                row["topic"], value, key=key, headers=[(k, v.encode()) for k, v in headers.items()])
            return sent
        except MessageSizeTooLargeError:
            if letter is None or shrink:
                raise
            return await self._send(row, shrink=True)

    async def retry_all(self, records: Sequence[LogRecord], error: TransientError) -> list[LogRecord]:
        """Send each record one step along the schedule, straight to Kafka (PostgreSQL is down); returns those
        not sent: no retry step left, or too large for a retry topic (both wait for PostgreSQL in place)."""
        now = datetime.now(UTC)
        sends, spent = [], []
        for r in records:
            failure = Failure(r, error, now, claimed_stream_id=r.key.decode("utf-8", "replace") if r.key else None)
            step = self.schedule.after(failure.attempts)
            if step is None or len(r.value) + len(r.key or b"") > MAX_EVENT_BYTES:
                spent.append(r)
                continue
            delay, topic = step
            sends.append((topic, r, failure_headers(failure, due=now + timedelta(seconds=delay))))
        try:
            futures = [await self._kafka.send(topic, r.value, key=r.key, headers=headers)
                       for topic, r, headers in sends]
            for future in futures:
                await asyncio.wait_for(future, _SEND_TIMEOUT_S)
        except (KafkaError, TimeoutError) as e:
            raise TransientError(f"cannot forward {len(sends)} records to the retry topics: {e}") from e
        return spent


class BatchHandler:
    """Applies a batch and routes what fails; never raises for a record, never drops one. ``outbox_pool``: the
    connection the outbox is published on, apart from the store's (a pool of one)."""

    def __init__(self, store: ProjectionStore, forwarder: Forwarder, outbox_pool: asyncpg.Pool) -> None:
        self._store, self._forwarder, self._outbox_pool = store, forwarder, outbox_pool

    async def handle(self, records: Sequence[LogRecord | Decoded]) -> BatchResult | None:
        """Apply ``records``; None if PostgreSQL was unavailable and they went to the retry topics instead.

        Returns once every record is projected, parked, dead-lettered or safe in a retry topic (or in the
        outbox, which is published here after the commit, or later if Kafka is down)."""
        pause = 0.2
        lock_wait = 0.0  # in attempts that gave up waiting for a lock
        while True:
            try:
                started = time.perf_counter()
                result = await self._store.apply_batch(records, route=self._forwarder.schedule.route)
            except StoreLockTimeout as e:
                # PostgreSQL is up and another transaction holds a lock (a worker frozen mid-batch, until PostgreSQL
                # ends its session): the same batch again, here. Copies in a retry topic would wait for that lock.
                metrics.LOCK_TIMEOUTS.inc()
                lock_wait += e.waited_s
                log.warning("%s; trying the batch again in place", e)
                await asyncio.sleep(0.1 * (0.5 + random.random()))  # noqa: S311 - jitter
                continue
            except StoreUnavailable as e:
                try:
                    records = await self._forwarder.retry_all([as_record(r) for r in records], e)
                except TransientError as kafka_down:
                    log.warning("%s; and %s", e, kafka_down)
                else:
                    if not records:
                        metrics.FORWARDED.inc()
                        log.warning("%s; the batch went to the retry topics", e)
                        return None
                    log.warning("%s; %d records cannot go to a retry topic: trying them again in place", e,
                                len(records))
            else:
                self._observe(records, result, time.perf_counter() - started, lock_wait + result.lock_wait_s)
                for f in result.retry:
                    log.info("retry %s seq %s attempt %d: %s", f.stream_id, f.seq, f.attempts, f.error.code)
                for f in result.dead:
                    log.warning("dead letter %s: %s %s seq %s: %s", f.dead_letter_id, f.error.code,
                                letter_stream(f.stream_id, f.claimed_stream_id), f.seq, f.message)
                if result.rows.get("outbox"):
                    await self.publish()
                return result
            await asyncio.sleep(pause * (0.5 + random.random()))  # noqa: S311 - jitter
            pause = min(pause * 2, 5.0)

    def _observe(self, records: Sequence[LogRecord | Decoded], result: BatchResult, seconds: float,
                 lock_wait_s: float) -> None:
        """Count the committed batch; never raises (the batch is done whatever the metrics say)."""
        try:
            schedule = self._forwarder.schedule
            first = as_record(records[0]) if records else None
            source = "retry" if first is not None and first.topic != f"{schedule.prefix}.events" else "log"
            delays = [delay_name(step[0]) for f in result.retry if (step := schedule.after(f.attempts)) is not None]
            metrics.observe_batch(result, source, len(records), seconds, delays, result.times, lock_wait_s)
        except Exception:
            log.exception("counting a batch in the metrics failed; the batch is committed")

    async def publish(self) -> int:
        """Publish the outbox; a failure is logged (the rows wait for the next call), never raised."""
        try:
            return await self._forwarder.publish(self._outbox_pool)
        except Exception as e:  # noqa: BLE001 - the rows stay; publishing must not stop projecting
            log.warning("%s; the copies stay in the outbox and are sent later", e)
            return 0
