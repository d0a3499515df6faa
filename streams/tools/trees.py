"""``runledger trees rebuild``: build from Kafka the transparency trees of partitions projected without them.

Leaf ``i`` of a partition's tree is the ``i``-th record read from the partition from its start (migration 012,
SPEC.md section 7). A database projected before migration 012 has stored offsets, audit rows that name no leaf and
no trees, and workers hold such partitions back (``runledger.streams.worker.logcheck``). For each partition whose
current tree ends before the group's stored offset (no tree: it ends at 0), this reads the partition with a
consumer of no group from where the tree ends up to the stored offset and, in one transaction under the tree's
row lock (which a worker's batch of the partition takes too):

- appends every record's leaf (its value byte for byte), in offset order, storing every perfect subtree it
  completes (level 0 with the record's offset) and the tree's new size, next offset and peaks;
- checks that the record before the stored offset is the one projected there (its SHA-256 is stored with the
  offset): a tree is only built of the log that was projected;
- names each audit row at those positions that names no leaf yet its leaf. ``audit_log`` is append-only by
  trigger; the trigger is disabled for that one statement, which sets nothing but ``tree`` and ``leaf_index``, and
  enabled again before commit (as migration 005 did). That takes ``audit_log``'s table lock until commit, so it is
  the transaction's last step, with a bounded wait for the lock.

A partition whose tree is complete is left alone: a second run does nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from runledger.projections.postgres.db import connect_one
from runledger.projections.postgres.queries import query
from runledger.schemas.errors import PermanentError, TransientError
from runledger.schemas.merkle import TreeState, leaf_hash
from runledger.streams.kafka import client_options, read_to_end, stop_consumer
from runledger.streams.settings import Settings

__all__ = ["PartitionTree", "TreesNotBuilt", "TreesReport", "rebuild_trees"]

Progress = Callable[[int, int], None]

_CHUNK = 50_000  # records read and stored at a time: memory stays bounded whatever the partition's size
_FETCH = 10_000  # records one fetch returns at most
_STALLED_S = 60.0
_LOCK_TIMEOUT = "5s"  # the wait for audit_log's table lock: workers' batches queue behind the request meanwhile
_LOCK_TRIES = 12


class TreesNotBuilt(PermanentError):
    """A partition's tree cannot be built from the log as it is: the message says why (the log no longer holds
    what was projected: see `runledger offsets check`). The trees built before it are kept; run the command again
    once the cause is dealt with."""

    code = "trees_not_built"


@dataclass(frozen=True, slots=True)
class PartitionTree:
    """What was done to one partition's tree: leaves appended for offsets ``from_offset`` to ``to_offset``
    (exclusive), its size now, and the audit rows that were given their leaf."""

    partition: int
    tree: int
    from_offset: int
    to_offset: int
    leaves_added: int
    size: int
    audit_rows: int


@dataclass(slots=True)
class TreesReport:
    topic: str
    partitions: list[PartitionTree] = field(default_factory=list)

    @property
    def leaves_added(self) -> int:
        return sum(p.leaves_added for p in self.partitions)

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "leaves_added": self.leaves_added,
                "partitions": [asdict(p) for p in self.partitions]}


async def rebuild_trees(settings: Settings, progress: Progress | None = None) -> TreesReport:
    """Build the trees of every partition of ``settings.events_topic`` that lag the offsets stored for
    ``settings.consumer_group`` (module docstring). ``progress``: called with (records read, records to read).

    Raises PermanentError if the schema is not migrated, TreesNotBuilt if the log does not hold what was
    projected, TransientError if Kafka cannot be read.
    """
    report = TreesReport(settings.events_topic)
    conn = await connect_one(settings.database_dsn(), settings.db_schema)
    consumer = AIOKafkaConsumer(**client_options(settings), group_id=None,
                                enable_auto_commit=False, auto_offset_reset="none",
                                max_partition_fetch_bytes=4 * 1024 * 1024)
    try:
        if not await conn.fetchval("SELECT to_regclass('log_trees') IS NOT NULL"):
            raise PermanentError(f"schema {settings.db_schema} has no transparency trees (migration 012): run "
                                 "`runledger db migrate` first")
        lagging = {r["partition"]: (r["tree_offset"] or 0, r["next_offset"]) for r in await conn.fetch(
            query("load_offsets_trees"), settings.consumer_group, settings.events_topic)
            if (r["tree_offset"] or 0) < r["next_offset"]}
        if not lagging:
            return report
        total = sum(stored - tree for tree, stored in lagging.values())
        done = 0

        def read(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        await consumer.start()
        for partition in sorted(lagging):
            built = await _build(conn, consumer, settings, partition, read)
            if built is not None:
                report.partitions.append(built)
    except KafkaError as e:
        raise TransientError(f"cannot read {settings.events_topic} at {settings.kafka_bootstrap_servers}: {e}") from e
    finally:
        await stop_consumer(consumer)
        await conn.close()
    return report


async def _build(conn: asyncpg.Connection, consumer: AIOKafkaConsumer, settings: Settings, partition: int,
                 read: Callable[[int], None]) -> PartitionTree | None:
    """One partition's tree, in one transaction; None if it no longer lags once its row is locked."""
    topic = settings.events_topic
    tp = TopicPartition(topic, partition)
    async with conn.transaction():
        await conn.execute(query("tree_create"), topic, [partition])
        row = await conn.fetchrow(query("tree_lock"), topic, [partition])
        target = await conn.fetchrow(query("tree_rebuild_target"), settings.consumer_group, topic, partition)
        first, stored = row["next_offset"], target["next_offset"]
        if first >= stored:  # a worker's batch extended it meanwhile, or another run built it
            return None
        start = (await consumer.beginning_offsets([tp]))[tp]
        if start > first:
            raise TreesNotBuilt(f"{topic} partition {partition} starts at offset {start}: records {first}..{start - 1} "
                                "were deleted (retention), so its tree cannot be built from the log")
        tree = TreeState(row["size"], [bytes(p) for p in row["peaks"]])
        size_before, last = tree.size, None
        consumer.assign([tp])
        position = first
        while position < stored:
            nodes: list[tuple[Any, ...]] = []
            chunk_end = min(stored, position + _CHUNK)

            def take(_: TopicPartition, messages: list[Any], nodes: list[tuple[Any, ...]] = nodes) -> None:
                nonlocal last
                for m in messages:
                    value = m.value or b""
                    made = tree.append(leaf_hash(value))
                    nodes.append((row["id"], 0, made[0][1], made[0][2], m.offset))
                    nodes += [(row["id"], level, index, h, None) for level, index, h in made[1:]]
                    last = (m.offset, value)
                read(len(messages))

            consumer.seek(tp, position)
            ends = await read_to_end(consumer, [tp], take, stalled_s=_STALLED_S, max_records=_FETCH,
                                     until={tp: chunk_end})
            if ends.get(tp, position) < chunk_end:
                raise TreesNotBuilt(f"{topic} partition {partition} ends at offset {ends.get(tp, position)}, but "
                                    f"its records up to offset {stored} were projected: the log topic was "
                                    "recreated or emptied since (see `runledger offsets check`)")
            if nodes:
                await conn.copy_records_to_table("log_tree_nodes", records=nodes,
                                                 columns=("tree", "level", "index", "hash", "kafka_offset"))
            position = chunk_end
        consumer.assign([])
        if target["last_sha256"] is not None and (
                last is None or last[0] != stored - 1 or hashlib.sha256(last[1]).hexdigest() != target["last_sha256"]):
            raise TreesNotBuilt(f"{topic} partition {partition} holds another record at offset {stored - 1} than the "
                                "one projected there: the log topic was recreated and written again since (see "
                                "`runledger offsets check`)")
        await conn.execute(query("tree_grow"), row["id"], tree.size, stored, tree.peaks)
        named = await _name_leaves(conn, row["id"], size_before, topic, partition)
        return PartitionTree(partition, row["id"], first, stored, tree.size - size_before, tree.size, named)


async def _name_leaves(conn: asyncpg.Connection, tree: int, since: int, topic: str, partition: int) -> int:
    """Give the audit rows at the positions of the tree's leaves from ``since`` on their leaf; how many."""
    await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
    for attempt in range(_LOCK_TRIES):
        try:
            async with conn.transaction():  # a savepoint: a lock that times out is tried again
                await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update_delete")
                status = await conn.execute(query("tree_rebuild_audit"), tree, since, topic, partition)
                await conn.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_update_delete")
                return int(status.split()[-1])
        except asyncpg.LockNotAvailableError:
            await asyncio.sleep(min(0.5 * 2 ** attempt, 5.0))
    raise TransientError("audit_log stayed locked by others for a minute: try again")
