"""Reads the log in whole batches and hands each one to a projector, resuming from PostgreSQL.

Offsets that count are those the store writes in the same transaction as the
projections; on every partition assignment the consumer seeks there. The
Kafka group commit that follows marks what is projected or safe in a retry
topic: the fallback when PostgreSQL is down, and what lag monitoring reads.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from projections.store import BatchResult, LogRecord, ProjectionStore, StoreUnavailable

__all__ = ["BatchConsumer"]

log = logging.getLogger(__name__)

Projector = Callable[[list[LogRecord]], Awaitable[BatchResult | None]]


class _SeekToStoredOffsets(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, consumer: AIOKafkaConsumer, store: ProjectionStore, topic: str) -> None:
        self._consumer, self._store, self._topic = consumer, store, topic

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        try:
            stored = await self._store.load_offsets(self._topic)
        except StoreUnavailable as e:
            # The group's Kafka offsets are never ahead of what is projected or safe in a retry topic.
            log.warning("%s; starting from the group's committed offsets", e)
            stored = {}
        for tp in assigned:
            if tp.partition in stored:
                self._consumer.seek(tp, stored[tp.partition])
        log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))


class BatchConsumer:
    """One consumer-group member of the log: ``run()`` until cancelled."""

    def __init__(self, bootstrap_servers: str, topic: str, group_id: str, store: ProjectionStore,
                 project: Projector, *, max_records: int = 5000) -> None:
        self.topic = topic
        self._store, self._project, self._max_records = store, project, max_records
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers, group_id=group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024,
            session_timeout_ms=6000, heartbeat_interval_ms=2000)
        self.assigned: set[int] = set()

    async def run(self) -> None:
        await self._consumer.start()
        self._consumer.subscribe([self.topic], listener=_SeekToStoredOffsets(self._consumer, self._store, self.topic))
        try:
            while True:
                fetched = await self._consumer.getmany(timeout_ms=500, max_records=self._max_records)
                self.assigned = {tp.partition for tp in self._consumer.assignment()}
                records = [LogRecord(m.topic, m.partition, m.offset, m.key, m.value or b"")
                           for batch in fetched.values() for m in batch]
                if not records:
                    continue
                await self._project(records)
                await self._consumer.commit({tp: batch[-1].offset + 1 for tp, batch in fetched.items() if batch})
        finally:
            await self._consumer.stop()
