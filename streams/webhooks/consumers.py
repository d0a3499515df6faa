"""The Kafka consumers of a delivery worker: the log, and one per deliveries' retry topic.

``OwedReader`` reads the log in the delivery workers' own group (``<RUNLEDGER_CONSUMER_GROUP>.webhooks``), writes
the messages each batch owes the endpoints (``messages.match``) in one transaction, and only then commits the batch
to Kafka: a worker that stops or dies before reads the batch again, and the messages already written are the same
rows (their ids come from the endpoint and the event). Its partitions are the ones whose messages this worker's
``Dispatcher`` sends, so each (endpoint, stream) has one sender.

``RetryReader`` reads one retry topic: each copy is attempted once it is due (a copy due later than its topic's
delay, after a long ``Retry-After``, waits that delay and goes on through the retry topic with the longest delay it
still needs, rather than hold the others back), then the attempts are recorded and the batch committed. A copy of
an attempt made already (a copy published twice, a message replayed or delivered meanwhile) is skipped:
PostgreSQL's state of the message decides.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from runledger.projections.postgres.db import database_error
from runledger.projections.postgres.queries import query
from runledger.projections.records import LogRecord
from runledger.schemas.events import MAX_EVENT_BYTES
from runledger.streams import metrics
from runledger.streams.kafka import stop_consumer
from runledger.streams.webhooks.delivery import Deliverer, Outcome, Recorder
from runledger.streams.webhooks.endpoints import Filter
from runledger.streams.webhooks.messages import EndpointView, Message, RetryCopy, match, read_retry_headers
from runledger.streams.worker.retry import message_time

__all__ = ["OwedReader", "RetryReader"]

log = logging.getLogger(__name__)

_FETCH_BYTES = 4 * MAX_EVENT_BYTES
_RETRY_BATCH = 64
_TRIES = 5  # a retry copy whose handling fails this often is left to the dispatcher (its message made pending)
T = TypeVar("T")


def _consumer(kafka: Mapping[str, Any], group_id: str, *, session_timeout_s: float, fetch_wait_ms: int
              ) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        **kafka, group_id=group_id, enable_auto_commit=False, auto_offset_reset="earliest",
        max_partition_fetch_bytes=_FETCH_BYTES, fetch_max_bytes=4 * _FETCH_BYTES,
        session_timeout_ms=round(session_timeout_s * 1000), heartbeat_interval_ms=round(session_timeout_s * 1000 / 3),
        fetch_max_wait_ms=fetch_wait_ms)


async def _fetch(consumer: AIOKafkaConsumer, topic: str, max_records: int) -> dict[TopicPartition, list[Any]]:
    """What has arrived (at most ``max_records``, waiting up to 0.5 s); nothing, a second later, if Kafka fails."""
    try:
        fetched: dict[TopicPartition, list[Any]] = await consumer.getmany(timeout_ms=500, max_records=max_records)
    except KafkaError as e:
        log.warning("reading %s: %s; trying again", topic, e)
        await asyncio.sleep(1)
        return {}
    return fetched


async def _commit(consumer: AIOKafkaConsumer, fetched: Mapping[TopicPartition, list[Any]], what: str) -> None:
    offsets = {tp: batch[-1].offset + 1 for tp, batch in fetched.items() if batch}
    try:
        await consumer.commit(offsets)
    except KafkaError as e:  # a rebalance took the partitions away: what was done is in PostgreSQL anyway
        log.warning("%s: commit failed (%s: %s); carrying on", what, type(e).__name__, e)


async def _until_written(what: str, write: Callable[[], Awaitable[T]]) -> T:
    """``write()`` until PostgreSQL takes it: nothing read is committed to Kafka before."""
    pause = 0.2
    while True:
        try:
            return await write()
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
            log.warning("%s: %s; trying again in %.1f s", what, database_error(e, "webhooks") or e, pause)
            await asyncio.sleep(pause * (0.5 + random.random()))  # noqa: S311 - jitter
            pause = min(pause * 2, 5.0)


class OwedReader:
    """Reads the log and writes what it owes the endpoints; ``run()`` until cancelled. ``owed``: called with each
    batch's messages once they are written (the dispatcher starts sending)."""

    def __init__(self, kafka: Mapping[str, Any], topic: str, group_id: str, pool: asyncpg.Pool,
                 owed: Callable[[list[Message]], Awaitable[None]], *, session_timeout_s: float = 6.0) -> None:
        self.topic, self._pool, self._owed = topic, pool, owed
        self._consumer = _consumer(kafka, group_id, session_timeout_s=session_timeout_s, fetch_wait_ms=50)

    @property
    def partitions(self) -> set[int]:
        return {tp.partition for tp in self._consumer.assignment()}

    async def run(self) -> None:
        await self._consumer.start()
        self._consumer.subscribe([self.topic])
        try:
            while True:
                fetched = await _fetch(self._consumer, self.topic, 2000)
                if not any(fetched.values()):
                    continue
                records = [(LogRecord(m.topic, m.partition, m.offset, m.key, m.value or b""),
                            message_time(m.timestamp)) for batch in fetched.values() for m in batch]
                messages = await _until_written(
                    f"cannot write the messages owed by {len(records)} records of {self.topic}",
                    lambda records=records: self._write(records))  # type: ignore[misc]
                await self._owed(messages)  # sent from PostgreSQL, whatever becomes of the commit
                await _commit(self._consumer, fetched, self.topic)
        finally:
            await stop_consumer(self._consumer)

    async def _write(self, records: list[tuple[LogRecord, datetime]]) -> list[Message]:
        async with self._pool.acquire() as conn, conn.transaction():
            endpoints = [EndpointView(r["endpoint_id"], Filter(tuple(r["types"]), r["stream_prefix"], r["source"]),
                                      r["created_at"], tuple(r["scope"] or ()) if r["owned"] else None)
                         for r in await conn.fetch(query("webhook_endpoints_all"))]
            messages, skipped = match(records, endpoints)
            if messages:
                columns = zip(*((m.msg_id, m.endpoint_id, m.stream_id, m.seq, m.event_id, m.event_type, m.event_hash,
                                 m.event_time, m.partition, m.offset, m.body) for m in messages), strict=True)
                written = {r["msg_id"] for r in await conn.fetch(query("webhook_enqueue"), *map(list, columns))}
                if len(written) < len(messages):
                    rest = [m.msg_id for m in messages if m.msg_id not in written]
                    known = {r["msg_id"] for r in await conn.fetch(query("webhook_known"), rest)}
                    for m in messages:
                        if m.msg_id not in written and m.msg_id not in known:
                            log.warning("%s[%d]@%d: %s seq %d is another event at a seq owed to %s already (the "
                                        "projection dead-letters it as a seq_conflict): not sent", self.topic,
                                        m.partition, m.offset, m.stream_id, m.seq, m.endpoint_id)
                            metrics.WEBHOOK_SKIPPED.labels("seq_conflict").inc()
        for s in skipped:
            metrics.WEBHOOK_SKIPPED.labels(s.reason).inc()
            log.info("%s[%d]@%d is no event (%s): no endpoint is owed it", self.topic, s.partition, s.offset,
                     s.reason)
        metrics.WEBHOOK_MESSAGES.inc(len(messages))
        return messages


class RetryReader:
    """Reads one retry topic of the deliveries; ``run()`` until cancelled. ``delivered``: called after a batch
    whose attempts freed messages held back behind them (the dispatcher sends those)."""

    def __init__(self, kafka: Mapping[str, Any], topic: str, delay: float, group_id: str, pool: asyncpg.Pool,
                 deliverer: Deliverer, recorder: Recorder, producer: AIOKafkaProducer,
                 delivered: Callable[[], None], *, topics: list[tuple[float, str]] | None = None,
                 session_timeout_s: float = 6.0) -> None:
        self.topic, self._delay, self._pool = topic, delay, pool
        self._topics = topics or [(delay, topic)]  # every retry topic, by delay: where a long wait goes on
        self._deliverer, self._recorder, self._producer, self._delivered = deliverer, recorder, producer, delivered
        self._consumer = _consumer(kafka, group_id, session_timeout_s=session_timeout_s, fetch_wait_ms=500)

    async def run(self) -> None:
        await self._consumer.start()
        self._consumer.subscribe([self.topic])
        try:
            while True:
                # Few at a time: a batch is committed once all its attempts are done, and even one endpoint timing
                # out at every attempt (8 at once, 15 s each) then ends it well within Kafka's poll interval.
                fetched = await _fetch(self._consumer, self.topic, _RETRY_BATCH)
                messages = [m for batch in fetched.values() for m in batch]
                if not messages:
                    continue
                # A copy published twice is one attempt (the outbox may send a copy again).
                once: dict[object, Any] = {}
                for m in messages:
                    copy = read_retry_headers(m.headers or [])
                    once.setdefault((copy.msg_id, copy.attempt) if copy is not None else (m.partition, m.offset), m)
                await self._retry_all(list(once.values()))
                await _commit(self._consumer, fetched, self.topic)
        finally:
            await stop_consumer(self._consumer)

    async def _retry_all(self, copies: list[Any]) -> None:
        """Attempt each copy once due, and record the attempts; a copy whose handling fails unexpectedly (Kafka
        refusing a copy sent round again, a fault of runledger's) is tried again, later and alone, never skipped:
        the batch is committed only once every copy is done."""
        pause, tries = 1.0, 0
        while copies:
            tries += 1
            results = await asyncio.gather(*(self._retry(m) for m in copies), return_exceptions=True)
            outcomes = [r for r in results if isinstance(r, Outcome)]
            await self._recorder.record(outcomes)
            if outcomes:
                self._delivered()
            failed = [(m, r) for m, r in zip(copies, results, strict=True) if isinstance(r, BaseException)]
            for m, error in failed:
                log.error("%s[%d]@%d: retrying the delivery failed (%s: %s); %s", m.topic, m.partition, m.offset,
                          type(error).__name__, error, f"trying it again in {pause:.0f} s" if tries < _TRIES else
                          "its message is left pending, for the dispatcher")
            copies = [m for m, _ in failed]
            if copies and tries >= _TRIES:
                copies = await self._leave_pending(copies)
            if copies:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)

    async def _leave_pending(self, copies: list[Any]) -> list[Any]:
        """Make the messages of ``copies`` pending (the dispatcher sends them); those PostgreSQL did not take."""
        left = []
        for m in copies:
            copy = read_retry_headers(m.headers or [])
            try:
                if copy is not None:
                    await self._pool.execute(query("webhook_set_pending"), copy.msg_id, copy.attempt)
                    self._delivered()
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                left.append(m)
        return left

    async def _retry(self, m: Any) -> Outcome | None:
        copy = read_retry_headers(m.headers or [])
        if copy is None:
            log.warning("%s[%d]@%d is no copy of a delivery runledger wrote: skipped", m.topic, m.partition,
                        m.offset)
            return None
        wait = (copy.due - datetime.now(UTC)).total_seconds() if copy.due is not None else 0.0
        if wait > 0:  # the topic is held up by its own delay at most
            await asyncio.sleep(min(wait, self._delay))
            wait = (copy.due - datetime.now(UTC)).total_seconds() if copy.due is not None else 0.0
        if wait > 1.0:  # a long Retry-After: on through the retry topic with the longest delay it still needs
            topic = max(((d, t) for d, t in self._topics if d <= wait), default=(self._delay, self.topic))[1]
            await self._producer.send_and_wait(topic, m.value, key=m.key, headers=list(m.headers or []))
            return None
        if wait > 0:
            await asyncio.sleep(wait)
        return await self._attempt(copy)

    async def _attempt(self, copy: RetryCopy) -> Outcome | None:
        while True:
            try:
                row = await self._pool.fetchrow(query("webhook_message"), copy.msg_id)
                if row is None or row["state"] != "retrying" or row["attempts"] != copy.attempt - 1:
                    return None  # delivered, replayed or attempted meanwhile: this copy is spent
                if not row["enabled"]:
                    await self._pool.execute(query("webhook_set_pending"), copy.msg_id, copy.attempt)
                    return None  # waits, pending, for `runledger webhooks enable`
                return await self._deliverer.attempt(copy.msg_id, row["endpoint_id"], row["stream_id"],
                                                     bytes(row["body"]), copy.attempt, row["event_time"],
                                                     replayed_after=row["replayed_after"])
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
                log.warning("%s: cannot read message %s (%s); trying again", self.topic, copy.msg_id,
                            database_error(e, "webhooks") or e)
                await asyncio.sleep(1.0 + random.random())  # noqa: S311 - jitter

