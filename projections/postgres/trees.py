"""The transparency logs as PostgreSQL keeps them: one tree per partition of the log topic (migration 012).

Leaf ``i`` of partition ``p`` is the ``i``-th record read from ``p`` from its start, its input the record's value
byte for byte (SPEC.md section 7). The worker that reads a record appends its leaf in the batch's transaction
(``grow``), under the row of that partition's tree, which only the partition's owner takes. A record applied
later (from a retry topic, a parking or a replay) is a leaf already: ``grow`` finds it by its log position.

A record read again from a retry topic before the log's reader appended its leaf (its batch was forwarded whole
while PostgreSQL was away, and the reader reads it again from the log since) gets an audit row that names no leaf:
its leaf is the one at its position, found through ``log_tree_nodes`` once the reader has appended it.

This copy serves proofs and checks; it proves nothing by itself. The signer (``runledger.streams.tools.signer``)
derives every root it signs from Kafka, and ``runledger verify log`` compares this copy with Kafka.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from runledger.projections.postgres.db import LockWaits
from runledger.projections.postgres.queries import query
from runledger.projections.records import LogRecord
from runledger.schemas.errors import TransientError
from runledger.schemas.merkle import Range, TreeState, fold, leaf_hash, subtrees

__all__ = ["StoredTree", "TreeBehind", "grow", "range_roots", "stored_trees"]


class TreeBehind(TransientError):
    """The batch's first record of a partition is not where the partition's tree ends, and the tree would start
    past the log's first offset: its reader skipped records (it resumed from the group's Kafka offsets while
    PostgreSQL was away, or the tree was retired under it). Nothing is written; the reader must read the
    partition again from where PostgreSQL says it was projected to."""

    code = "tree_behind"

    def __init__(self, message: str, partition: int) -> None:
        super().__init__(message)
        self.partition = partition


Position = tuple[str, int, int]
"""(topic, partition, offset) of a record in the log."""


@dataclass(frozen=True, slots=True)
class StoredTree:
    """A partition's tree as stored: its id, size, the offset after its last leaf, and its peaks."""

    id: int
    topic: str
    partition: int
    size: int
    next_offset: int
    peaks: tuple[bytes, ...]

    @property
    def root(self) -> bytes:
        return fold(self.peaks)

    @classmethod
    def of(cls, row: asyncpg.Record) -> StoredTree:
        return cls(row["id"], row["topic"], row["partition"], row["size"], row["next_offset"],
                   tuple(bytes(p) for p in row["peaks"]))


async def grow(conn: asyncpg.Connection, fresh: Sequence[LogRecord], wanted: Sequence[Position],
               waits: LockWaits) -> dict[Position, tuple[int, int]]:
    """Append the leaves of the ``fresh`` records not in their partition's tree yet (in offset order, under the
    trees' row locks, held until commit), and return the (tree, leaf index) of each position in ``wanted``
    that is a leaf (a record read before this batch is found by its offset). ``waits`` counts the time spent
    taking the row locks."""
    found: dict[Position, tuple[int, int]] = {}
    by_partition: dict[tuple[str, int], dict[int, bytes]] = defaultdict(dict)
    for r in fresh:
        by_partition[r.topic, r.partition][r.offset] = r.value
    for topic in sorted({t for t, _ in by_partition}):
        partitions = sorted(p for t, p in by_partition if t == topic)
        with waits.timing():
            rows = await conn.fetch(query("tree_lock"), topic, partitions)
            if len(rows) < len(partitions):  # a partition's first leaf: its tree starts
                await conn.execute(query("tree_create"), topic, partitions)
                rows = await conn.fetch(query("tree_lock"), topic, partitions)
        for row in rows:
            records = by_partition[topic, row["partition"]]
            new = sorted(o for o in records if o >= row["next_offset"])
            if not new:
                continue
            if row["size"] == 0 and new[0] > 0:
                raise TreeBehind(f"{topic} partition {row['partition']}: its tree would start at offset {new[0]}, "
                                 "not at the log's start: records before it were not read", row["partition"])
            tree = TreeState(row["size"], [bytes(p) for p in row["peaks"]])
            nodes: list[tuple[Any, ...]] = []
            for offset in new:
                found[topic, row["partition"], offset] = (row["id"], tree.size)
                made = tree.append(leaf_hash(records[offset]))
                nodes.append((row["id"], 0, made[0][1], made[0][2], offset))
                nodes += [(row["id"], level, index, h, None) for level, index, h in made[1:]]
            await conn.copy_records_to_table("log_tree_nodes", records=nodes,
                                             columns=("tree", "level", "index", "hash", "kafka_offset"))
            await conn.execute(query("tree_grow"), row["id"], tree.size, new[-1] + 1, tree.peaks)
    if missing := [p for p in wanted if p not in found]:
        for r in await conn.fetch(query("tree_leaves_at"), *(list(column) for column in zip(*missing, strict=True))):
            found[r["topic"], r["partition"], r["kafka_offset"]] = (r["tree"], r["index"])
    return found


async def stored_trees(conn: asyncpg.Connection, topic: str) -> dict[int, StoredTree]:
    """partition -> the current tree of each partition of ``topic`` that has one."""
    return {r["partition"]: StoredTree.of(r) for r in await conn.fetch(query("trees"), topic)}


async def range_roots(conn: asyncpg.Connection, tree: int, ranges: Sequence[Range]) -> list[bytes]:
    """The MTH of each range of leaves of ``tree``, from the stored perfect subtrees it splits into (one query)."""
    split = [subtrees(lo, hi) for lo, hi in ranges]
    wanted = sorted({node for nodes in split for node in nodes})
    stored = {(r["level"], r["index"]): bytes(r["hash"]) for r in await conn.fetch(
        query("tree_nodes"), tree, [level for level, _ in wanted], [index for _, index in wanted])}
    missing = [node for node in wanted if node not in stored]
    if missing:
        raise LookupError(f"tree {tree} lacks the subtrees {missing[:5]} (level, index)")
    return [fold([stored[node] for node in nodes]) for nodes in split]
