"""The transparency log as PostgreSQL holds it: the tree head at the current size, and checkpoints kept.

The tree itself is appended to by the store (``store._append_audit``); here it is read: the root at the
size ``tlog_state`` says, folded from the roots of the perfect subtrees that size splits into (its peaks).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from runledger.projections.postgres.queries import query
from runledger.schemas.checkpoint import Checkpoint, Signer
from runledger.schemas.merkle import fold

__all__ = ["KeptCheckpoint", "sign_checkpoint", "tree_head"]


@dataclass(frozen=True, slots=True)
class KeptCheckpoint:
    id: int
    checkpoint: Checkpoint
    note: str
    signed_at: datetime


async def tree_head(conn: asyncpg.Connection) -> tuple[int, bytes]:
    """(size, root) of the transparency log now."""
    row = await conn.fetchrow(query("tlog_head"))
    return int(row["size"]), fold(list(row["peaks"]))


async def sign_checkpoint(conn: asyncpg.Connection, signer: Signer, origin: str) -> KeptCheckpoint:
    """Sign the tree head as it is now, keep the signed note in ``checkpoints``, and return it."""
    async with conn.transaction():
        size, root = await tree_head(conn)
        checkpoint = Checkpoint(origin, size, root)
        note = signer.sign(checkpoint)
        row = await conn.fetchrow(query("insert_checkpoint"), origin, size, root, signer.name, note)
    return KeptCheckpoint(row["id"], checkpoint, note, row["signed_at"])
