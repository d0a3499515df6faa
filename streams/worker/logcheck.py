"""Does the log still hold what was projected? Checked on every partition assignment, and by
``runledger offsets``.

The offsets that count are stored in PostgreSQL with the projections, with the
SHA-256 of the record just before them. A log topic that was recreated or
emptied since (the embedded broker keeps its log in memory, so ``runledger dev
down`` empties it) ends before that offset, or holds another record there.
Seeking to the stored offset would then wait for ever, or skip records that
were never projected; so such a partition is not projected, and the problem is
recorded in ``log_problems`` for ``runledger dev status``, ``runledger wait``
and ``runledger demo`` to show, until ``runledger offsets reset`` says what to
do.

A partition's transparency tree (``log_trees``) grows in the same transactions as its stored offset, so its next
offset is the stored offset. A database projected before migration 012 has offsets and no trees: a worker would
make the first record it reads now leaf 0. Such a partition is held back too, until ``runledger trees rebuild``
has built its tree from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from runledger.projections.postgres.db import connect_one
from runledger.projections.postgres.queries import query
from runledger.projections.postgres.wait import WORKER_GONE_S
from runledger.schemas.errors import PermanentError, TransientError
from runledger.streams.kafka import client_options, stop_consumer
from runledger.streams.settings import Settings

__all__ = ["FIX", "TREES_FIX", "PartitionCheck", "Stored", "Trees", "check_log", "check_partitions",
           "projection_health", "reset_offsets", "save_problems"]

T = TypeVar("T")

FIX = ("run `runledger offsets reset` to project the partition's log from its start (the projections made so far "
       "are kept), or `runledger dev down --purge` to start over with empty tables")

TREES_FIX = "run `runledger trees rebuild` to build the partition's tree from the log"
_TREE_AHEAD_FIX = ("find out who moved the stored offset back; if the log was recreated, `runledger offsets reset` "
                   "starts a new tree")

Stored = Mapping[int, tuple[int, str | None]]
"""partition -> (next offset, SHA-256 of the record at next offset - 1), as stored with the projections."""

Trees = Mapping[int, int]
"""partition -> the next offset of its current transparency tree (no entry: no tree), read with ``Stored``."""


@dataclass(frozen=True, slots=True)
class PartitionCheck:
    """One partition: the stored offset (None: none stored), the log's start and end, what is wrong, and what to
    do about it."""

    topic: str
    partition: int
    stored: int | None
    start: int
    end: int
    problem: str | None = None
    fix: str | None = None

    @property
    def resettable(self) -> bool:
        """Is the problem the log's (``runledger offsets reset`` is the fix), not the transparency tree's?"""
        return self.problem is not None and self.fix == FIX

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def check_partitions(consumer: AIOKafkaConsumer, topic: str, partitions: Sequence[int], stored: Stored, *,
                           trees: Trees | None, timeout: float = 5.0) -> list[PartitionCheck]:
    """Check ``partitions`` of ``topic`` against ``stored``, using ``consumer`` (started, no group), and, unless
    ``trees`` is None, each partition's transparency tree against its stored offset (a partition whose log
    matches, stored offset > 0, and a tree that does not end there: no tree counts as ending at 0).

    Raises KafkaError or TimeoutError when the log cannot be read.
    """
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    if not tps:
        return []
    starts = await consumer.beginning_offsets(tps)
    ends = await consumer.end_offsets(tps)
    checks, fingerprints = {}, {}
    for tp in tps:
        start, end = starts[tp], ends[tp]
        offset, sha = stored.get(tp.partition, (None, None))
        problem = None
        if offset is None and start > 0:
            problem = (f"{topic} partition {tp.partition} starts at offset {start}, not 0, and none of it was "
                       f"projected yet: records 0..{start - 1} are not in the log (deleted before they were "
                       "projected, or the broker reports a wrong start)")
        elif offset is not None and offset < start:
            problem = (f"{topic} partition {tp.partition} starts at offset {start}: records {offset}..{start - 1} "
                       "were deleted before they were projected")
        elif offset is not None and sha is not None and offset > start:
            # The record itself decides, not the end offset: a broker may report a stale end after a restart.
            fingerprints[tp] = sha
        elif offset is not None and offset > end:
            problem = _shorter(topic, tp.partition, end, offset)
        checks[tp] = PartitionCheck(topic, tp.partition, offset, start, end, problem, FIX if problem else None)
    if fingerprints:
        found = await _records_before(consumer, {tp: stored[tp.partition][0] for tp in fingerprints}, timeout)
        for tp, sha in fingerprints.items():
            offset = stored[tp.partition][0]
            if tp not in found:
                problem = _shorter(topic, tp.partition, ends[tp], offset)
            elif found[tp] != sha:
                problem = (f"{topic} partition {tp.partition} holds another record at offset {offset - 1} than the "
                           "one projected there: the log topic was recreated and written again since")
            else:
                continue
            checks[tp] = PartitionCheck(topic, tp.partition, offset, starts[tp], ends[tp], problem, FIX)
    if trees is not None:
        for tp, check in checks.items():
            if check.problem is None and check.stored and trees.get(tp.partition, 0) != check.stored:
                checks[tp] = _tree_differs(check, trees.get(tp.partition, 0))
    return [checks[tp] for tp in tps]


def _tree_differs(check: PartitionCheck, tree: int) -> PartitionCheck:
    where = (f"the transparency tree of {check.topic} partition {check.partition} covers offsets up to {tree} while "
             f"the projections cover up to {check.stored}")
    if tree < (check.stored or 0):
        return replace(check, fix=TREES_FIX, problem=(
            f"{where}: records were projected without their leaves (before migration 012), and the next record "
            "read would get a wrong leaf index"))
    return replace(check, fix=_TREE_AHEAD_FIX, problem=(
        f"{where}: the stored offset was moved back, and the tree may be of another log"))


def _shorter(topic: str, partition: int, end: int, offset: int) -> str:
    return (f"{topic} partition {partition} ends at offset {end}, but its records up to offset {offset} were "
            "projected: the log topic was recreated or emptied since (with RUNLEDGER_KAFKA_STORAGE=memory the "
            "embedded broker keeps its log in memory, so `runledger dev down` empties it)")


async def _records_before(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int],
                          timeout: float) -> dict[TopicPartition, str]:
    """SHA-256 of the record at ``offset - 1`` of each partition; a partition without one is left out."""
    consumer.assign(list(offsets))
    for tp, offset in offsets.items():
        consumer.seek(tp, offset - 1)
    found: dict[TopicPartition, str] = {}
    with contextlib.suppress(TimeoutError):  # nothing there: the log ends before it
        async with asyncio.timeout(timeout):
            while len(found) < len(offsets):
                fetched = await consumer.getmany(*[tp for tp in offsets if tp not in found], timeout_ms=500,
                                                 max_records=1)
                for tp, messages in fetched.items():
                    for m in messages:
                        if m.offset == offsets[tp] - 1:
                            found[tp] = hashlib.sha256(m.value or b"").hexdigest()
                        else:  # compacted away, or a log that differs: no record there to match
                            found[tp] = ""
    consumer.assign([])
    return found


async def save_problems(conn: asyncpg.Connection | asyncpg.Pool, group_id: str, partitions: int,
                        checks: Sequence[PartitionCheck]) -> None:
    """Record the checks' problems in ``log_problems`` and clear the partitions that have none."""
    for c in checks:
        if c.problem is not None:
            await conn.execute(query("problem_set"), group_id, c.topic, c.partition, partitions, c.stored,
                               c.start, c.end, f"{c.problem}; {c.fix or FIX}")
    by_topic: dict[str, list[int]] = {}
    for c in checks:
        if c.problem is None:
            by_topic.setdefault(c.topic, []).append(c.partition)
    for topic, clear in by_topic.items():
        await conn.execute(query("problem_clear"), group_id, topic, clear)


async def _with_log(settings: Settings, work: Callable[[AIOKafkaConsumer, asyncpg.Connection], Awaitable[T]]) -> T:
    """Run ``work`` with a group-less consumer of the log and an owner connection on the schema."""
    conn = await connect_one(settings.database_dsn(), settings.db_schema)
    consumer = AIOKafkaConsumer(**client_options(settings), group_id=None,
                                enable_auto_commit=False)
    try:
        await consumer.start()
        return await work(consumer, conn)
    except KafkaError as e:
        raise TransientError(f"cannot read {settings.events_topic} at {settings.kafka_bootstrap_servers}: {e}") from e
    except asyncpg.UndefinedTableError:
        raise PermanentError(f"schema {settings.db_schema} has no projection tables: run `runledger db migrate` "
                             "(or start a worker) first") from None
    finally:
        await stop_consumer(consumer)
        await conn.close()


async def _check_all(consumer: AIOKafkaConsumer, conn: asyncpg.Connection,
                     settings: Settings) -> tuple[int, list[PartitionCheck]]:
    topic = settings.events_topic
    await consumer._client.force_metadata_update()  # noqa: SLF001 - a topic created since the client started
    partitions = sorted(consumer.partitions_for_topic(topic) or ())
    rows = await conn.fetch(query("load_offsets_trees"), settings.consumer_group, topic)
    stored = {r["partition"]: (r["next_offset"], r["last_sha256"]) for r in rows}
    trees = {r["partition"]: r["tree_offset"] for r in rows if r["tree_offset"] is not None}
    return len(partitions), await check_partitions(consumer, topic, partitions, stored, trees=trees)


async def check_log(settings: Settings) -> list[PartitionCheck]:
    """``runledger offsets check``: every partition of the log against the offsets stored for the group."""
    async def work(consumer: AIOKafkaConsumer, conn: asyncpg.Connection) -> list[PartitionCheck]:
        count, checks = await _check_all(consumer, conn, settings)
        await save_problems(conn, settings.consumer_group, count, checks)
        return checks
    return await _with_log(settings, work)


async def reset_offsets(settings: Settings, partitions: Sequence[int] = ()) -> list[PartitionCheck]:
    """``runledger offsets reset``: the partitions whose log does not match (of ``partitions``, if given) are
    projected again from the start of the log as it is now, and their transparency trees retired (a new one starts
    with the new log). Returns them, as they were before the reset. A partition whose only problem is its tree is
    left alone: ``runledger trees rebuild`` is its fix."""
    async def work(consumer: AIOKafkaConsumer, conn: asyncpg.Connection) -> list[PartitionCheck]:
        count, checks = await _check_all(consumer, conn, settings)
        chosen = [c for c in checks if c.resettable and (not partitions or c.partition in partitions)]
        async with conn.transaction():
            for c in chosen:
                await conn.execute(query("reset_offset"), settings.consumer_group, c.topic, c.partition, c.start)
                await conn.execute(query("tree_retire"), c.topic, c.partition)
            await save_problems(conn, settings.consumer_group, count,
                                [replace(c, stored=c.start, problem=None, fix=None) for c in chosen])
        return chosen
    return await _with_log(settings, work)


async def projection_health(settings: Settings) -> dict[str, Any]:
    """The group's live workers and the partitions they hold back, as PostgreSQL records them."""
    conn = await connect_one(settings.database_dsn(), settings.db_schema)
    try:
        workers = await conn.fetch(query("live_workers"), settings.consumer_group, WORKER_GONE_S)
        problems = await conn.fetch(query("problems"), settings.consumer_group, settings.events_topic)
    except asyncpg.UndefinedTableError:
        workers, problems = [], []
    finally:
        await conn.close()
    return {
        "workers": [{"worker": w["worker_id"], "pid": w["pid"], "host": w["host"], "partitions": w["partitions"],
                     "seen_at": w["seen_at"].isoformat()} for w in workers],
        "problems": [{"partition": p["partition"], "problem": p["problem"], "stored_offset": p["stored_offset"],
                      "log_start": p["log_start"], "log_end": p["log_end"],
                      "detected_at": p["detected_at"].isoformat()} for p in problems],
    }
