"""What a worker does with a batch (SPEC.md section 6), and the Kafka side of retries and dead letters.

``Forwarder`` writes records to the retry topics and the dead-letter topic and
returns once Kafka has acknowledged them. ``BatchHandler.handle`` applies a
batch and, when PostgreSQL is unavailable, sends the whole batch one step
along the retry schedule instead of blocking every stream behind it. Records
that have used up the schedule while PostgreSQL is still down stay where they
are and are tried again in place: their dead letter needs the database, and an
outage is not the event's fault.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from projections.store import BatchResult, DeadLetterCopy, Failure, LogRecord, ProjectionStore, StoreUnavailable
from schemas.errors import TransientError
from streams.retry import RetrySchedule, dlq_topic, failure_headers

__all__ = ["BatchHandler", "Forwarder"]

log = logging.getLogger(__name__)


class Forwarder:
    """Sends failed records to the retry topics and the dead-letter topic (a ``projections.store.Forward``)."""

    def __init__(self, bootstrap_servers: str, schedule: RetrySchedule) -> None:
        self.schedule = schedule
        self.dlq_topic = dlq_topic(schedule.prefix)
        # Tansu refuses idempotent producers (InitProducerId); a duplicate here is harmless anyway.
        self._kafka = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", enable_idempotence=False,
                                       linger_ms=5)

    async def start(self) -> None:
        try:
            await self._kafka.start()
        except KafkaError as e:
            raise TransientError(f"cannot reach Kafka to forward failed records: {e}") from e

    async def stop(self) -> None:
        await self._kafka.stop()

    async def __call__(self, retry: list[Failure], dead: list[Failure]) -> dict[int, DeadLetterCopy]:
        """Send ``retry`` one step along the schedule and ``dead`` to the dead-letter topic; wait for the acks."""
        now = datetime.now(UTC)
        sends = []
        for f in retry:
            step = self.schedule.after(f.attempts)
            if step is None:
                raise ValueError(f"record at attempt {f.attempts} has no retry left")  # the store dead-letters it
            delay, topic = step
            sends.append((None, topic, f, failure_headers(f, due=now + timedelta(seconds=delay))))
        sends += [(f.dead_letter_id, self.dlq_topic, f, failure_headers(f)) for f in dead]
        try:
            futures = [(letter, await self._kafka.send(topic, f.record.value, key=f.record.key, headers=headers))
                       for letter, topic, f, headers in sends]
            copies = {}
            for letter, future in futures:
                meta = await future
                if letter is not None:
                    copies[letter] = (meta.topic, meta.partition, meta.offset)
        except KafkaError as e:
            raise TransientError(f"cannot forward {len(sends)} failed records to Kafka: {e}") from e
        for f in retry:
            log.info("retry %s attempt %d: %s", f.stream_id or f.record.key, f.attempts, f.error.code)
        for f in dead:
            log.warning("dead letter %s: %s %s seq %s: %s", f.dead_letter_id, f.error.code, f.stream_id, f.seq,
                        f.error)
        return copies

    async def retry_all(self, records: Sequence[LogRecord], error: TransientError) -> list[LogRecord]:
        """Send each record one step along the schedule; returns those with no step left (not sent)."""
        now = datetime.now(UTC)
        sendable, spent = [], []
        for r in records:
            failure = Failure(r, error, now, r.key.decode("utf-8", "replace") if r.key else None)
            (sendable if self.schedule.after(failure.attempts) else spent).append(failure)
        if sendable:
            await self(sendable, [])
        return [f.record for f in spent]


class BatchHandler:
    """Applies a batch and routes what fails; never raises for a record, never drops one."""

    def __init__(self, store: ProjectionStore, forwarder: Forwarder) -> None:
        self._store, self._forwarder = store, forwarder

    async def handle(self, records: Sequence[LogRecord]) -> BatchResult | None:
        """Apply ``records``; None if PostgreSQL was unavailable and they went to the retry topics instead."""
        pause = 0.2
        while True:
            try:
                return await self._store.apply_batch(records, forward=self._forwarder)
            except StoreUnavailable as e:
                try:
                    records = await self._forwarder.retry_all(records, e)
                except TransientError as kafka_down:
                    log.warning("%s; and %s", e, kafka_down)
                else:
                    if not records:
                        log.warning("%s; the batch went to the retry topics", e)
                        return None
                    log.warning("%s; %d records have used up their retries: trying them again in place", e,
                                len(records))
            except TransientError as e:  # Kafka unavailable while forwarding: the transaction rolled back
                log.warning("%s", e)
            await asyncio.sleep(pause * (0.5 + random.random()))  # noqa: S311 - jitter
            pause = min(pause * 2, 5.0)
