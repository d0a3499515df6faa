"""`runledger topics create` against the real broker: every topic, with its partitions; twice is fine."""

from __future__ import annotations

import os
import subprocess

import orjson
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from runledger.streams.settings import Settings
from runledger.streams.topics import check_log_topic
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


async def test_retry_topics_keep_records_for_a_while_and_the_rest_for_ever(env: dict[str, str],
                                                                          settings: Settings) -> None:
    run_env = {**os.environ, **env, "RUNLEDGER_RETRY_RETENTION_MS": "3600000"}
    done = subprocess.run([*CLI, "topics", "create", "--json"], env=run_env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    topics = orjson.loads(done.stdout)["topics"]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
    finally:
        await admin.close()
    kept = {name: dict((k, v) for k, v, *_ in entries)["retention.ms"]
            for response in described for *_, name, entries in response.resources}
    prefix = settings.topic_prefix
    assert {name for name, ms in kept.items() if ms == "3600000"} == {t for t in topics if ".retry." in t}
    assert kept[f"{prefix}.events"] == kept[f"{prefix}.events.dlq"] == kept[f"{prefix}.checkpoints"] == "-1"


async def test_a_worker_refuses_a_log_topic_that_deletes_records(env: dict[str, str], settings: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(settings.events_topic, 2, 1, topic_configs={"retention.ms": "86400000"})])
    finally:
        await admin.close()
    refused = subprocess.run([*CLI, "worker"], env={**os.environ, **env}, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "retention.ms=86400000" in refused.stderr and "--add-config retention.ms=-1" in refused.stderr


async def test_a_worker_refuses_a_log_topic_with_fewer_partitions_than_configured(env: dict[str, str],
                                                                                  settings: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:  # as a broker's automatic topic creation might have made it, before `runledger topics create`
        await admin.create_topics([NewTopic(settings.events_topic, 2, 1, topic_configs={"retention.ms": "-1"})])
    finally:
        await admin.close()
    assert settings.event_partitions == 4
    refused = subprocess.run([*CLI, "worker"], env={**os.environ, **env}, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "has 2 partitions, fewer than RUNLEDGER_EVENT_PARTITIONS=4" in refused.stderr, refused.stderr
    assert f"--topic {settings.events_topic} --partitions 4" in refused.stderr
    assert "or set RUNLEDGER_EVENT_PARTITIONS=2" in refused.stderr
    for enough in (1, 2):  # as many partitions as configured, or more: a worker starts
        await check_log_topic(settings.model_copy(update={"event_partitions": enough}))
