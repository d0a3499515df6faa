"""``runledger checkpoint``, ``prove`` and ``prove-consistency``: sign the transparency log's tree head, keep
it and publish it to Kafka; proofs from the stored tree."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from runledger.projections.postgres.db import connect_one
from runledger.projections.postgres.queries import query
from runledger.projections.postgres.tlog import KeptCheckpoint, consistency, inclusion, sign_checkpoint
from runledger.schemas.checkpoint import Signer
from runledger.schemas.errors import PermanentError, TransientError
from runledger.schemas.proofs import consistency_document, inclusion_document
from runledger.streams.settings import Settings
from runledger.streams.topics import ensure_topics

__all__ = ["prove_consistency", "prove_inclusion", "publish_checkpoint"]


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


async def prove_inclusion(settings: Settings, event_id: str) -> dict[str, Any]:
    conn = await connect_one(settings.database_url, settings.db_schema)
    try:
        note, raw, index, proof = await inclusion(conn, event_id, settings.checkpoint_origin)
    finally:
        await conn.close()
    return inclusion_document(note, raw, index, proof)


async def prove_consistency(settings: Settings, old: str, new: str | None) -> dict[str, Any]:
    """A consistency proof from checkpoint note ``old`` to ``new`` (default: the newest kept)."""
    conn = await connect_one(settings.database_url, settings.db_schema)
    try:
        if new is None:
            new = await conn.fetchval(query("covering_checkpoint"), -1, settings.checkpoint_origin)
            if new is None:
                raise PermanentError("no checkpoint is kept yet: sign one with `runledger checkpoint`")
        sizes = []
        for note in (old, new):
            lines = note.split("\n")
            if len(lines) < 3 or not lines[1].isdigit():
                raise PermanentError("a checkpoint note starts with its origin and its size, one per line")
            sizes.append(int(lines[1]))
        if sizes[0] > sizes[1]:
            raise PermanentError(f"the old checkpoint ({sizes[0]}) is larger than the new one ({sizes[1]})")
        proof = await consistency(conn, sizes[0], sizes[1])
    finally:
        await conn.close()
    return consistency_document(old, new, proof)
