"""Creating runledger's Kafka topics: infinite retention (SPEC.md section 1), created once."""

from __future__ import annotations

from collections.abc import Mapping

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from runledger.schemas.errors import TransientError
from runledger.streams.settings import Settings
from runledger.streams.worker.retry import RetrySchedule, dlq_topic

__all__ = ["ensure_topics", "worker_topics"]

_TOPIC_ALREADY_EXISTS = 36


async def ensure_topics(settings: Settings, topics: Mapping[str, int]) -> None:
    """Create each topic (name -> partitions) that does not exist yet, with ``retention.ms=-1`` and
    ``settings.topic_replication_factor`` replicas."""
    bootstrap_servers = settings.kafka_bootstrap_servers
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        await admin.start()
        response = await admin.create_topics(
            [NewTopic(name, num_partitions=n, replication_factor=settings.topic_replication_factor,
                      topic_configs={"retention.ms": "-1"})
             for name, n in topics.items()]
        )
    except KafkaError as e:
        raise TransientError(f"cannot create topics on {bootstrap_servers}: {e}") from e
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
