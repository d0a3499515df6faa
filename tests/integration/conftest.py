"""Helpers for tests against the real embedded stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from streams.settings import Settings

CHILD = Path(__file__).with_name("append_child.py")


async def read_log(settings: Settings, topic: str | None = None) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` (default: the events topic), partition by partition, in log order."""
    topic = topic or settings.events_topic
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - a brand-new topic
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            return []
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {tp: [] for tp in partitions}
        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in partitions])

        while await behind():
            batch = await consumer.getmany(timeout_ms=1000)
            for tp, items in batch.items():
                records[tp].extend(items)
        return [r for tp in partitions for r in records[tp]]
    finally:
        await consumer.stop()


def spawn_child(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """Run ``append_child.py`` in a process of its own, with the test's RUNLEDGER_* settings."""
    return subprocess.Popen([sys.executable, str(CHILD), *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
