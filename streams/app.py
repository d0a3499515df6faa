"""The Faust application of a projection worker: ``create_app(settings)``.

An aiokafka consumer task (``streams.consumer``) reads the log in whole
batches and sends each through an in-memory channel to the ``project`` agent,
which applies it in one PostgreSQL transaction and answers with the result. A
Faust agent reading records one by one manages about 7,000 records/s on two
cores; batches through a channel keep the agent thin and the path fast.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import faust

from projections.pricing import load_tokencost_catalog
from projections.store import BatchResult, LogRecord, ProjectionStore, connect, migrate
from streams.consumer import BatchConsumer
from streams.settings import Settings
from streams.topics import ensure_topics

__all__ = ["create_app"]


@dataclass
class _Work:
    records: list[LogRecord]
    done: asyncio.Future[BatchResult] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def create_app(settings: Settings) -> faust.App:
    """A Faust app whose agent projects the log into ``settings.db_schema``."""
    app = faust.App(
        f"{settings.topic_prefix}-worker",
        broker=f"kafka://{settings.kafka_bootstrap_servers.split(',')[0]}",
        web_enabled=False,
        producer_acks=-1,
        topic_replication_factor=1,
        topic_allow_declare=True,
        # Tansu holds a new join for half the session timeout; Faust's 60 s default
        # would keep a starting worker idle for 30 s.
        broker_session_timeout=6.0,
        broker_heartbeat_interval=2.0,
        broker_rebalance_timeout=10.0,
        datadir=str(settings.state_dir / "faust"),
    )
    channel = app.channel()
    state: dict[str, Any] = {}

    @app.agent(channel)
    async def project(works: Any) -> None:
        async for work in works:
            try:
                work.done.set_result(await state["store"].apply_until_done(work.records))
            except Exception as e:  # noqa: BLE001 - handed to the consumer task, which must not wait forever
                work.done.set_exception(e)

    async def send(records: list[LogRecord]) -> BatchResult:
        work = _Work(records)
        await channel.put(work)
        return await work.done

    @app.task
    async def consume() -> None:
        await migrate(settings.database_url, settings.db_schema)
        # A worker may start before any producer: with no topic to subscribe to, it would idle
        # until the next metadata refresh (minutes).
        await ensure_topics(settings.kafka_bootstrap_servers, {settings.events_topic: settings.event_partitions})
        pool = await connect(settings.database_url, settings.db_schema)
        catalog = load_tokencost_catalog()
        await ProjectionStore.save_catalog(pool, catalog)
        state["store"] = store = ProjectionStore(pool, catalog, settings.consumer_group)
        consumer = BatchConsumer(settings.kafka_bootstrap_servers, settings.events_topic, settings.consumer_group,
                                 store, send)
        try:
            await consumer.run()
        finally:
            await pool.close()

    return app
