"""A consumer that checked a log shorter than what was projected still stops (aiokafka 0.14 would wait for ever)."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from runledger.streams.kafka import stop_consumer
from runledger.streams.settings import Settings
from runledger.streams.worker.logcheck import check_partitions


async def test_a_consumer_stops_after_checking_a_log_that_ends_before_the_stored_offset(settings: Settings) -> None:
    topic = settings.events_topic
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_idempotence=False)
    await producer.start()
    try:
        for _ in range(10):
            await producer.send_and_wait(topic, b"{}", partition=0)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False,
                                auto_offset_reset="none")
    await consumer.start()
    # As a worker's checker on an assignment: records up to offset 49 were projected, the log has 10.
    [check] = await check_partitions(consumer, topic, [0], {0: (50, "0" * 64)}, trees=None, timeout=2)
    assert check.problem is not None and "recreated or emptied" in check.problem
    # With `await consumer.stop()` this waits for ever: the fetch routine swallows its cancellation.
    await asyncio.wait_for(stop_consumer(consumer, grace_s=1), 30)
