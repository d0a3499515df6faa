"""``runledger checkpoint``: sign the transparency log's tree head, keep it, and publish it to Kafka."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from runledger.projections.postgres.db import connect_one
from runledger.projections.postgres.tlog import KeptCheckpoint, sign_checkpoint
from runledger.schemas.checkpoint import Signer
from runledger.schemas.errors import TransientError
from runledger.streams.settings import Settings
from runledger.streams.topics import ensure_topics

__all__ = ["publish_checkpoint"]


async def publish_checkpoint(settings: Settings, signer: Signer) -> KeptCheckpoint:
    """Sign and keep a checkpoint, then publish its note to ``<prefix>.checkpoints`` (key: the origin)."""
    conn = await connect_one(settings.database_url, settings.db_schema)
    try:
        kept = await sign_checkpoint(conn, signer, settings.checkpoint_origin)
    finally:
        await conn.close()
    await ensure_topics(settings.kafka_bootstrap_servers, {settings.checkpoints_topic: 1})
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all",
                                enable_idempotence=False)  # Tansu refuses idempotent producers
    try:
        await producer.start()
        await producer.send_and_wait(settings.checkpoints_topic, kept.note.encode(),
                                     key=settings.checkpoint_origin.encode())
    except KafkaError as e:
        raise TransientError(f"checkpoint {kept.id} is kept in PostgreSQL, but publishing it to "
                             f"{settings.checkpoints_topic} failed: {e}") from e
    finally:
        await producer.stop()
    return kept
