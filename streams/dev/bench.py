"""``runledger bench``: projection throughput, measured against a plain aiokafka + asyncpg COPY consumer.

Every run uses a topic, schema and consumer group of its own and removes the
schemas afterwards. Three consumers read the same records:

- ``baseline``: aiokafka ``getmany`` and ``COPY`` of the raw records into one
  table, one transaction per batch: the floor cost of moving bytes from Kafka
  into PostgreSQL.
- ``projection``: the same reading loop, but each batch goes through
  ``ProjectionStore.apply_batch`` (parse, hash and chain checks, rules, audit
  rows, upserts, offsets): the cost of runledger's work, without Faust.
- ``worker``: a real ``runledger worker`` process (Faust, consumer group),
  timed from its first projected event to its last, so start-up is excluded.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from runledger.projections.postgres.db import connect, connect_one, migrate
from runledger.projections.postgres.queries import query, quote_schema
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.pricing import load_tokencost_catalog
from runledger.projections.records import LogRecord
from runledger.schemas.chain import Head
from runledger.schemas.errors import TransientError
from runledger.streams.dev import WORKER_COMMAND
from runledger.streams.dev.fleet import simulate_fleet
from runledger.streams.producer.events import build_events
from runledger.streams.settings import Settings
from runledger.streams.topics import ensure_topics

__all__ = ["Measurement", "run_bench"]

_EVENTS_PER_EXECUTION = 15  # about, in the simulated fleet


@dataclass(frozen=True, slots=True)
class Measurement:
    name: str
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


async def _publish(settings: Settings, events: int) -> tuple[int, Measurement]:
    values = []
    for run in simulate_fleet(max(events // _EVENTS_PER_EXECUTION, 1), seed=1, run_tag=settings.topic_prefix):
        batch = build_events("/bench", run.stream_id, Head(), run.events)
        values += [(run.stream_id.encode(), v) for v in batch.values]
    await ensure_topics(settings.kafka_bootstrap_servers, {settings.events_topic: settings.event_partitions})
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all",
                                enable_idempotence=False, linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    started = time.monotonic()
    try:
        for start in range(0, len(values), 10_000):
            futures = [await producer.send(settings.events_topic, value, key=key)
                       for key, value in values[start:start + 10_000]]
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(values), Measurement("publish (aiokafka producer)", len(values), time.monotonic() - started)


async def _consume_all(settings: Settings, total: int, handle: Callable[[list[LogRecord]], Awaitable[None]]) -> float:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None,
                                enable_auto_commit=False, max_partition_fetch_bytes=4 * 1024 * 1024)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(settings.events_topic, p) for p in range(settings.event_partitions)])
        await consumer.seek_to_beginning()
        started, done = time.monotonic(), 0
        while done < total:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=5000)
            batch = [LogRecord(m.topic, m.partition, m.offset, m.key, m.value or b"")
                     for messages in fetched.values() for m in messages]
            if batch:
                await handle(batch)
                done += len(batch)
        return time.monotonic() - started
    finally:
        await consumer.stop()


async def _baseline(settings: Settings, schema: str, total: int) -> Measurement:
    conn = await connect_one(settings.database_url, schema)
    try:
        await conn.execute(query("bench_create_raw"))

        async def copy(batch: list[LogRecord]) -> None:
            async with conn.transaction():
                await conn.copy_records_to_table("bench_raw", records=[
                    (r.topic, r.partition, r.offset, r.key, r.value) for r in batch])

        return Measurement("baseline (aiokafka + COPY)", total, await _consume_all(settings, total, copy))
    finally:
        await conn.close()


async def _projection(settings: Settings, schema: str, total: int) -> Measurement:
    await migrate(settings.database_url, schema)
    pool = await connect(settings.database_url, schema)
    try:
        store = ProjectionStore(pool, load_tokencost_catalog(), "bench")

        async def project(batch: list[LogRecord]) -> None:
            await store.apply_batch(batch)

        return Measurement("projection (apply_batch, no Faust)", total, await _consume_all(settings, total, project))
    finally:
        await pool.close()


async def _worker(settings: Settings, total: int, timeout: float) -> Measurement:
    env = {**os.environ, "RUNLEDGER_TOPIC_PREFIX": settings.topic_prefix, "RUNLEDGER_DB_SCHEMA": settings.db_schema,
           "RUNLEDGER_CONSUMER_GROUP": settings.consumer_group}
    worker = subprocess.Popen(WORKER_COMMAND, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    conn = await asyncpg.connect(settings.database_url)
    count = f"SELECT count(*) FROM {quote_schema(settings.db_schema)}.audit_log"  # a fixed, validated name
    try:
        deadline, first, projected = time.monotonic() + timeout, None, 0
        while projected < total:
            if worker.poll() is not None:
                stderr = worker.stderr.read().decode(errors="replace") if worker.stderr else ""
                raise TransientError(f"the worker exited after projecting {projected} of {total}: {stderr}")
            if time.monotonic() > deadline:
                raise TransientError(f"the worker projected {projected} of {total} in {timeout:.0f} s")
            try:
                projected = await conn.fetchval(count)
            except asyncpg.UndefinedTableError:
                projected = 0
            if projected and first is None:
                first = (time.monotonic(), projected)
            await asyncio.sleep(0.05)
        assert first is not None
        return Measurement("worker (runledger worker, Faust)", total - first[1], time.monotonic() - first[0])
    finally:
        worker.terminate()
        await asyncio.to_thread(worker.communicate, timeout=30)
        await conn.close()


async def run_bench(settings: Settings, events: int, *, worker: bool = True,
                    progress: Callable[[str], None] = lambda _: None) -> list[Measurement]:
    """Publish about ``events`` simulated events to a fresh topic and measure each consumer."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime()) + uuid.uuid4().hex[:6]
    settings = settings.model_copy(update={"topic_prefix": f"bench{stamp}", "db_schema": f"bench_{stamp}",
                                           "consumer_group": f"bench-{stamp}"})
    schemas = [f"bench_{stamp}_raw", f"bench_{stamp}_projection", settings.db_schema]
    progress(f"generating and publishing about {events:,} events to {settings.events_topic} ...")
    total, published = await _publish(settings, events)
    results = [published]
    admin = await asyncpg.connect(settings.database_url)
    try:
        await admin.execute(f"CREATE SCHEMA {quote_schema(schemas[0])}")
        progress("baseline: aiokafka + COPY ...")
        results.append(await _baseline(settings, schemas[0], total))
        progress("projection: the same loop through apply_batch ...")
        results.append(await _projection(settings, schemas[1], total))
        if worker:
            progress("worker: a runledger worker process (start-up excluded) ...")
            results.append(await _worker(settings, total, timeout=600))
    finally:
        for schema in schemas:
            await admin.execute(f"DROP SCHEMA IF EXISTS {quote_schema(schema)} CASCADE")
        await admin.close()
    return results
