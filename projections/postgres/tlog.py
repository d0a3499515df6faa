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
from runledger.schemas.errors import PermanentError
from runledger.schemas.merkle import Range, consistency_ranges, fold, inclusion_ranges, subtrees

__all__ = ["KeptCheckpoint", "consistency", "inclusion", "sign_checkpoint", "sign_if_due", "tree_head"]


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


async def sign_checkpoint(conn: asyncpg.Connection, signer: Signer, origin: str, topic: str) -> KeptCheckpoint:
    """Sign the tree head as it is now, keep the signed note in ``checkpoints`` and put it in the outbox for
    ``topic``, in one transaction; the outbox publishes it once that commits."""
    async with conn.transaction():
        size, root = await tree_head(conn)
        checkpoint = Checkpoint(origin, size, root)
        note = signer.sign(checkpoint)
        row = await conn.fetchrow(query("insert_checkpoint"), origin, size, root, signer.name, note)
        await conn.execute(query("insert_outbox"), topic, origin.encode(), note.encode(), {}, None)
    return KeptCheckpoint(row["id"], checkpoint, note, row["signed_at"])


async def sign_if_due(pool: asyncpg.Pool, signer: Signer, origin: str, topic: str,
                      interval_s: float) -> KeptCheckpoint | None:
    """What a worker does on its checkpoint timer: sign unless another worker is signing, one was signed
    within the interval, or the tree has not grown since the last."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval(query("checkpoint_try_lock")):
            return None
        if not await conn.fetchval(query("checkpoint_due"), origin, interval_s):
            return None
        return await sign_checkpoint(conn, signer, origin, topic)


async def _range_roots(conn: asyncpg.Connection, ranges: list[Range]) -> list[bytes]:
    """The MTH of each range, from the stored perfect subtrees it splits into (one query for all)."""
    split = [subtrees(lo, hi) for lo, hi in ranges]
    wanted = sorted({node for nodes in split for node in nodes})
    stored = {(r["level"], r["index"]): r["hash"] for r in await conn.fetch(
        query("tlog_nodes"), [level for level, _ in wanted], [index for _, index in wanted])}
    return [fold([stored[node] for node in nodes]) for nodes in split]


async def inclusion(conn: asyncpg.Connection, event_id: str, origin: str) -> tuple[str, bytes, int, list[bytes]]:
    """(the newest kept checkpoint that covers the event, its stored bytes, its leaf index, the audit path)."""
    leaf = await conn.fetchrow(query("tlog_leaf"), event_id)
    if leaf is None:
        raise PermanentError(f"event {event_id} is not in audit_log")
    note = await conn.fetchval(query("covering_checkpoint"), leaf["tlog_index"], origin)
    if note is None:
        raise PermanentError(f"no checkpoint of {origin} covers event {event_id} (leaf {leaf['tlog_index']}) yet: "
                             "sign one with `runledger checkpoint`")
    size = Checkpoint.parse(note).size
    proof = await _range_roots(conn, inclusion_ranges(leaf["tlog_index"], size))
    return note, bytes(leaf["raw"]), int(leaf["tlog_index"]), proof


async def consistency(conn: asyncpg.Connection, old_size: int, new_size: int) -> list[bytes]:
    """PROOF(old_size, D[new_size]) from the stored tree (``new_size`` at most its size now)."""
    return await _range_roots(conn, consistency_ranges(old_size, new_size))
