"""The Faust application of a projection worker: ``create_app(settings)``.

An aiokafka consumer task (``streams.consumer``) reads the log in whole
batches and sends each through an in-memory channel to the ``project`` agent,
which applies it in one PostgreSQL transaction and answers with the result. A
Faust agent reading records one by one manages about 7,000 records/s on two
cores; batches through a channel keep the agent thin and the path fast.

One Faust agent per retry topic takes what failed for a transient reason,
waits until it is due, and applies it the same way (``streams.forward``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import faust

from projections.pricing import load_tokencost_catalog
from projections.store import BatchResult, LogRecord, ProjectionStore, connect, migrate
from streams.consumer import BatchConsumer
from streams.forward import BatchHandler, Forwarder
from streams.retry import RetrySchedule, delay_name, from_retry_topic
from streams.settings import Settings

__all__ = ["create_app"]

log = logging.getLogger(__name__)


@dataclass
class _Work:
    records: list[LogRecord]
    done: asyncio.Future[BatchResult | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


def create_app(settings: Settings) -> faust.App:
    """A Faust app whose agents project the log, and its retry topics, into ``settings.db_schema``."""
    app = faust.App(
        f"{settings.topic_prefix}-worker",
        broker=f"kafka://{settings.kafka_bootstrap_servers.split(',')[0]}",
        web_enabled=False,
        producer_acks=-1,
        topic_replication_factor=1,
        topic_partitions=settings.event_partitions,
        topic_allow_declare=True,
        # Tansu holds a new join for half the session timeout; Faust's 60 s default
        # would keep a starting worker idle for 30 s.
        broker_session_timeout=6.0,
        broker_heartbeat_interval=2.0,
        broker_rebalance_timeout=10.0,
        datadir=str(settings.state_dir / "faust"),
        # On shutdown, do not wait for buffered retry records to be acked: they are delivered again.
        stream_wait_empty=False,
    )
    schedule = RetrySchedule(settings.topic_prefix, settings.retry_delays)
    channel = app.channel()
    ready: asyncio.Future[BatchHandler] = asyncio.Future(loop=app.loop)

    @app.agent(channel)
    async def project(works: Any) -> None:
        handler = await ready
        async for work in works:
            try:
                work.done.set_result(await handler.handle(work.records))
            except Exception as e:  # noqa: BLE001 - handed to the consumer task, which must not wait forever
                work.done.set_exception(e)

    async def send(records: list[LogRecord]) -> BatchResult | None:
        work = _Work(records)
        await channel.put(work)
        return await work.done

    for delay, topic_name in schedule.topics:
        _retry_agent(app, ready, delay, topic_name)

    @app.task
    async def consume() -> None:
        await migrate(settings.database_url, settings.db_schema)
        pool = await connect(settings.database_url, settings.db_schema)
        catalog = load_tokencost_catalog()
        await ProjectionStore.save_catalog(pool, catalog)
        store = ProjectionStore(pool, catalog, settings.consumer_group, max_attempts=schedule.max_attempts)
        forwarder = Forwarder(settings.kafka_bootstrap_servers, schedule)
        await forwarder.start()
        ready.set_result(BatchHandler(store, forwarder))
        consumer = BatchConsumer(settings.kafka_bootstrap_servers, settings.events_topic, settings.consumer_group,
                                 store, send)
        try:
            await consumer.run()
        finally:
            await forwarder.stop()
            await pool.close()

    return app


def _retry_agent(app: faust.App, ready: asyncio.Future[BatchHandler], delay: float, topic_name: str) -> None:
    """The agent of one retry topic: waits until each batch is due, then applies it."""
    topic = app.topic(topic_name, key_serializer="raw", value_serializer="raw")

    async def retry(stream: Any) -> None:
        handler = await ready
        # Faust acks a batch's messages only after the loop body has handled them.
        async for events in stream.take_events(1000, within=0.2):
            batch = [from_retry_topic(e.message.topic, e.message.partition, e.message.offset, e.message.key,
                                      e.message.value or b"", e.message.headers or [],
                                      datetime.fromtimestamp(e.message.timestamp, UTC), delay) for e in events]
            # A topic's records are due in the order they were written: wait for the last one.
            wait = (max(due for _, due in batch) - datetime.now(UTC)).total_seconds()
            if wait > 0:
                await asyncio.sleep(min(wait, delay))
            # Faust acks the batch when the body returns or raises: an unexpected error must not get that far.
            while True:
                try:
                    await handler.handle([record for record, _ in batch])
                    break
                except Exception:
                    log.exception("a batch of %s failed unexpectedly; trying it again in 5 s", topic_name)
                    await asyncio.sleep(5)

    app.agent(topic, name=f"retry-{delay_name(delay)}")(retry)
