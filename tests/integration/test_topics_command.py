"""`runledger topics create` against the real broker: every topic, with its partitions; twice is fine."""

from __future__ import annotations

import os
import subprocess

import orjson
from aiokafka.admin import AIOKafkaAdminClient

from runledger.streams.settings import Settings
from tests.conftest import CLI


async def test_topics_are_created_once_with_the_partitions_asked(env: dict[str, str], settings: Settings) -> None:
    run_env = {**os.environ, **env, "RUNLEDGER_EVENT_PARTITIONS": "6"}
    for _ in range(2):
        done = subprocess.run([*CLI, "topics", "create", "--json"], env=run_env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
    topics = orjson.loads(done.stdout)["topics"]
    prefix = settings.topic_prefix
    assert topics[f"{prefix}.events"] == 6 and topics[f"{prefix}.checkpoints"] == 1
    assert f"{prefix}.events.retry.1s" in topics and f"{prefix}.events.dlq" in topics
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_topics([f"{prefix}.events"])
        assert len(described[0]["partitions"]) == 6
    finally:
        await admin.close()
