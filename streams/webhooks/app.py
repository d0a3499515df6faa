"""The Faust application of a webhook delivery worker: ``create_app(settings)`` (``runledger webhooks worker``).

Its consumers (``consumers.py``) read the log in the delivery workers' own group and each deliveries' retry topic;
the ``deliver`` agent takes each batch of messages the log owes and starts sending them (``delivery.Dispatcher``);
a timer publishes what the outbox still holds (copies of failed messages for the retry and dead-letter topics,
which a worker that died did not send), makes pending again a retrying message whose copy is lost (10 minutes past
due), and reads the delivery gauges. Several delivery workers share the log's
partitions, as projection workers do; each sends the messages of the partitions it holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import faust
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from runledger.projections.postgres.db import database_error
from runledger.projections.postgres.queries import query
from runledger.schemas.errors import TransientError
from runledger.schemas.events import MAX_EVENT_BYTES
from runledger.streams import metrics
from runledger.streams.http.keys import load_key
from runledger.streams.kafka import client_options
from runledger.streams.runtime import run_together, tune_gc
from runledger.streams.settings import Settings
from runledger.streams.webhooks.consumers import OwedReader, RetryReader
from runledger.streams.webhooks.delivery import Deliverer, Dispatcher, Recorder
from runledger.streams.webhooks.messages import Message
from runledger.streams.worker.app import faust_app, worker_pool
from runledger.streams.worker.outbox import Forwarder
from runledger.streams.worker.retry import RetrySchedule, delay_name, webhook_retry_topic

__all__ = ["create_app", "webhook_group"]

log = logging.getLogger(__name__)

_SWEEP_S = 5.0
_OVERDUE_S = 600.0  # a retry copy this late past its due time is taken as lost


def webhook_group(settings: Settings) -> str:
    """The delivery workers' consumer group of the log: apart from the projection's."""
    return f"{settings.consumer_group}.webhooks"


@dataclass
class _Ready:
    pool: asyncpg.Pool
    outbox_pool: asyncpg.Pool
    forwarder: Forwarder
    dispatcher: Dispatcher


def create_app(settings: Settings) -> faust.App:
    app = faust_app(settings, "webhooks")
    channel = app.channel()
    ready: asyncio.Future[_Ready] = asyncio.Future(loop=app.loop)

    @app.agent(channel)
    async def deliver(batches: Any) -> None:
        dispatcher = (await ready).dispatcher
        async for messages in batches:
            if messages:
                dispatcher.wake.set()

    async def owed(messages: list[Message]) -> None:
        await channel.put(messages)  # type: ignore[arg-type]  # a channel carries any object, typed for events

    @app.task
    async def consume() -> None:
        app.flow_control.resume()
        await _run(settings, ready, owed)

    @app.timer(_SWEEP_S)
    async def sweep_outbox() -> None:
        if ready.done():
            r = await ready
            try:
                await r.forwarder.publish(r.outbox_pool)
            except Exception as e:  # noqa: BLE001 - the copies stay in the outbox for the next sweep
                log.warning("%s; the copies stay in the outbox", e)
            try:
                overdue = await r.pool.fetchval(query("webhook_retry_overdue"), _OVERDUE_S)
                if overdue:
                    log.warning("%d retrying messages whose copy did not come back %.0f s past due are pending "
                                "again (a retry topic no longer read, or kept for less than the workers were away)",
                                overdue, _OVERDUE_S)
                metrics.observe_webhooks(await r.pool.fetchrow(query("webhook_gauges")))
            except Exception as e:  # noqa: BLE001 - stale gauges are no reason to stop delivering
                log.warning("cannot read the delivery gauges: %s", database_error(e, "webhooks") or e)

    return app


async def _run(settings: Settings, ready: asyncio.Future[_Ready],
               owed: Callable[[list[Message]], Awaitable[None]]) -> None:
    key = load_key(settings)
    pool = await worker_pool(settings, max_size=8)
    outbox_pool = await worker_pool(settings, max_size=1)
    kafka = client_options(settings)
    forwarder = Forwarder(kafka, RetrySchedule(settings.topic_prefix, settings.retry_delays), settings.db_schema)
    await forwarder.start()
    producer = AIOKafkaProducer(**kafka, acks="all", enable_idempotence=False, max_request_size=2 * MAX_EVENT_BYTES)
    try:
        await producer.start()
    except KafkaError as e:
        raise TransientError(f"cannot reach Kafka: {e}") from e

    async def publish() -> None:
        await forwarder.publish(outbox_pool)

    recorder = Recorder(pool, settings, publish)
    deliverer = Deliverer(pool, key, settings)
    group = webhook_group(settings)
    reader = OwedReader(kafka, settings.events_topic, group, pool, owed,
                        session_timeout_s=settings.worker_session_timeout_s)
    dispatcher = Dispatcher(pool, deliverer, recorder, lambda: reader.partitions, asyncio.Event())
    ready.set_result(_Ready(pool, outbox_pool, forwarder, dispatcher))
    tune_gc()
    topics = {webhook_retry_topic(settings.topic_prefix, d): d for d in settings.webhook_retry_delays}
    by_delay = [(delay, topic) for topic, delay in topics.items()]
    retries = [RetryReader(kafka, topic, delay, f"{group}.retry.{delay_name(delay)}", pool, deliverer, recorder,
                           producer, dispatcher.wake.set, topics=by_delay,
                           session_timeout_s=settings.worker_session_timeout_s)
               for topic, delay in topics.items()]
    try:
        await run_together([reader.run(), dispatcher.run(), *(r.run() for r in retries)])
    finally:
        await recorder.stop()
        await producer.stop()
        await forwarder.stop()
        await outbox_pool.close()
        await pool.close()
