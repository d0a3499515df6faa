"""Creating runledger's Kafka topics, once: the log, the dead letters and the checkpoints kept for ever (SPEC.md
section 1); the retry topics, which a record only passes through, for ``RUNLEDGER_RETRY_RETENTION_MS``. A worker
starts only on a log topic kept for ever, with the partitions it is configured for (``check_log_topic``)."""

from __future__ import annotations

from collections.abc import Mapping

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from runledger.schemas.errors import PermanentError, TransientError
from runledger.streams.kafka import client_options
from runledger.streams.settings import Settings
from runledger.streams.worker.retry import RetrySchedule, dlq_topic, webhook_dlq_topic, webhook_retry_topic

__all__ = ["LogNotKept", "LogTooFewPartitions", "check_log_topic", "ensure_topics", "topic_configs", "webhook_topics",
           "worker_topics"]

_TOPIC_ALREADY_EXISTS = 36


class LogNotKept(PermanentError):
    """The log topic deletes records: the source of truth would lose them (SPEC.md section 1)."""

    code = "log_not_kept"


class LogTooFewPartitions(PermanentError):
    """The log topic has fewer partitions than ``RUNLEDGER_EVENT_PARTITIONS`` (made before ``runledger topics
    create``, by a broker's automatic topic creation for example): fewer workers can share it than planned.
    Add partitions to the topic, or set ``RUNLEDGER_EVENT_PARTITIONS`` to the partitions it has."""

    code = "log_too_few_partitions"


def topic_configs(settings: Settings, name: str) -> dict[str, str]:
    """The configuration a new topic is created with: a retry topic keeps records for the retry retention,
    every other topic for ever."""
    retry_topics = {topic for _, topic in RetrySchedule(settings.topic_prefix, settings.retry_delays).topics}
    retry_topics |= {webhook_retry_topic(settings.topic_prefix, d) for d in settings.webhook_retry_delays}
    return {"retention.ms": str(settings.retry_retention_ms) if name in retry_topics else "-1"}


async def ensure_topics(settings: Settings, topics: Mapping[str, int]) -> None:
    """Create each topic (name -> partitions) that does not exist yet, with ``topic_configs`` and
    ``settings.topic_replication_factor`` replicas."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    try:
        await admin.start()
        response = await admin.create_topics(
            [NewTopic(name, num_partitions=n, replication_factor=settings.topic_replication_factor,
                      topic_configs=topic_configs(settings, name))
             for name, n in topics.items()]
        )
    except KafkaError as e:
        raise TransientError(f"cannot create topics on {settings.kafka_bootstrap_servers}: {e}") from e
    finally:
        await admin.close()
    for name, code, message in response.topic_errors:
        if code not in (0, _TOPIC_ALREADY_EXISTS):
            raise TransientError(f"cannot create topic {name}: error {code} {message}")


def worker_topics(settings: Settings) -> dict[str, int]:
    """Every topic a worker reads or writes: the log, the retry topics, the dead-letter topic, and the
    checkpoints (one partition: in the order they are signed)."""
    schedule = RetrySchedule(settings.topic_prefix, settings.retry_delays)
    names = [settings.events_topic, *(topic for _, topic in schedule.topics), dlq_topic(settings.topic_prefix)]
    return {**dict.fromkeys(names, settings.event_partitions), settings.checkpoints_topic: 1}


def webhook_topics(settings: Settings) -> dict[str, int]:
    """The topics a webhook delivery worker writes besides: the deliveries' retry topics (kept for the retry
    retention) and their dead-letter topic (kept for ever), with the log's partitions."""
    names = [*dict.fromkeys(webhook_retry_topic(settings.topic_prefix, d) for d in settings.webhook_retry_delays),
             webhook_dlq_topic(settings.topic_prefix)]
    return dict.fromkeys(names, settings.event_partitions)


async def check_log_topic(settings: Settings) -> None:
    """LogNotKept if the log topic deletes records (``retention.ms`` other than -1, or ``retention.bytes`` other
    than -1), LogTooFewPartitions if it has fewer partitions than ``settings.event_partitions``, each naming the
    fix; TransientError if Kafka cannot say."""
    topic = settings.events_topic
    admin = AIOKafkaAdminClient(**client_options(settings))
    try:
        await admin.start()
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        described = await admin.describe_topics([topic])
    except KafkaError as e:
        raise TransientError(f"cannot read the configuration of {topic}: {e}") from e
    finally:
        await admin.close()
    for *_, entries in response.resources:
        for name, value, *_ in entries:
            if name in ("retention.ms", "retention.bytes") and value not in (None, "-1"):
                raise LogNotKept(f"topic {topic} has {name}={value}: the log would lose records, "
                                 f"and the record with them. Keep it for ever: kafka-configs --alter --entity-type "
                                 f"topics --entity-name {topic} --add-config {name}=-1")
    partitions = sum(len(t["partitions"]) for t in described if t["topic"] == topic)
    if partitions < settings.event_partitions:
        raise LogTooFewPartitions(
            f"topic {topic} has {partitions} partitions, fewer than RUNLEDGER_EVENT_PARTITIONS="
            f"{settings.event_partitions} (was it created before `runledger topics create`, by the broker's automatic "
            f"topic creation?): no more than {partitions} workers can share it. Add partitions: kafka-topics --alter "
            f"--topic {topic} --partitions {settings.event_partitions} (a stream's later events may then land on "
            f"another partition than its earlier ones; workers still apply each stream in seq order), or set "
            f"RUNLEDGER_EVENT_PARTITIONS={partitions}")
