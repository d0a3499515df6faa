"""``runledger checkpoint``, ``prove`` and ``prove-consistency``: sign the transparency log's tree head, keep
it and publish it to Kafka; proofs from the stored tree."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from runledger.projections.postgres.db import connect, connect_one
from runledger.projections.postgres.queries import query
from runledger.projections.postgres.tlog import KeptCheckpoint, consistency, inclusion, sign_checkpoint
from runledger.schemas.checkpoint import Checkpoint, Signer
from runledger.schemas.errors import PermanentError
from runledger.schemas.proofs import consistency_document, inclusion_document
from runledger.streams.settings import Settings
from runledger.streams.topics import ensure_topics
from runledger.streams.worker.outbox import Forwarder
from runledger.streams.worker.retry import RetrySchedule

__all__ = ["checkpoint_signer", "create_signer_key", "prove_consistency", "prove_inclusion", "publish_checkpoint",
           "verifier_key"]


def verifier_key(settings: Settings, key: str | None) -> str:
    """The verifier key ``key`` names: the key itself, or a file holding it; by default the ``.pub`` file
    beside the signer key."""
    key = key or f"{settings.checkpoint_key_path}.pub"
    return Path(key).read_text().strip() if Path(key).is_file() else key


def checkpoint_signer(settings: Settings) -> Signer | None:
    """The signer key in ``RUNLEDGER_CHECKPOINT_KEY``, or None if there is none (`runledger keys init`)."""
    try:
        return Signer.from_private_key(settings.checkpoint_key_path.read_text())
    except FileNotFoundError:
        return None


def create_signer_key(settings: Settings) -> Signer:
    """A new signer key, written to ``RUNLEDGER_CHECKPOINT_KEY`` (mode 0600, replacing what is there) with its
    verifier key beside it as ``<key>.pub``."""
    signer = Signer.generate(settings.checkpoint_origin)
    path = settings.checkpoint_key_path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(signer.private_key + "\n")
    path.with_name(path.name + ".pub").write_text(signer.verifier_key + "\n")
    return signer


async def publish_checkpoint(settings: Settings, signer: Signer) -> KeptCheckpoint:
    """Sign and keep a checkpoint, then publish its note to ``<prefix>.checkpoints`` through the outbox
    (key: the origin); if Kafka fails, the outbox keeps it for the workers to publish."""
    await ensure_topics(settings, {settings.checkpoints_topic: 1})
    pool = await connect(settings.database_url, settings.db_schema, max_size=1)
    forwarder = Forwarder(settings.kafka_bootstrap_servers, RetrySchedule(settings.topic_prefix,
                                                                          settings.retry_delays), settings.db_schema)
    try:
        async with pool.acquire() as conn:
            kept = await sign_checkpoint(conn, signer, settings.checkpoint_origin, settings.checkpoints_topic)
        await forwarder.start()
        try:
            await forwarder.publish(pool)
        finally:
            await forwarder.stop()
    finally:
        await pool.close()
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
        sizes = [Checkpoint.parse(note).size for note in (old, new)]
        if sizes[0] > sizes[1]:
            raise PermanentError(f"the old checkpoint ({sizes[0]}) is larger than the new one ({sizes[1]})")
        proof = await consistency(conn, sizes[0], sizes[1])
    finally:
        await conn.close()
    return consistency_document(old, new, proof)
