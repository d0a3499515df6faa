"""The Kafka consumers of a worker: the log, and one per retry topic, each feeding whole batches to a projector.

Nothing is committed to Kafka before the projector has returned, that is before
every record of the batch is projected, parked, dead-lettered or safe in a
retry topic or the outbox; a consumer cancelled at any point (SIGTERM, SIGINT,
a crash) commits nothing, and what it had read is delivered again. A commit
that fails because the group rebalanced is logged and ignored: the batch is
durable in PostgreSQL, and whoever owns the partition now starts after it.

The log's offsets that count are those the store writes in the same
transaction as the projections; on every partition assignment the consumer
checks them against the log (``runledger.streams.worker.logcheck``) and seeks there, or holds the
partition back, checking it again in a task of its own, less and less often. The Kafka
group commit is the fallback when PostgreSQL is down, and what lag monitoring
reads. Retry topics have no offsets in PostgreSQL: their group commit is what
counts, so a record there is read again until its batch is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from runledger.projections.planner import Decoded, decoded
from runledger.projections.postgres.db import StoreUnavailable, database_error
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.postgres.trees import TreeBehind
from runledger.projections.records import BatchResult, LogRecord
from runledger.schemas.events import MAX_EVENT_BYTES
from runledger.streams import metrics
from runledger.streams.kafka import stop_consumer
from runledger.streams.worker.logcheck import check_partitions, save_problems
from runledger.streams.worker.retry import delay_name, from_retry_topic, message_time

__all__ = ["LogConsumer", "Projector", "RetryConsumer"]

log = logging.getLogger(__name__)

Projector = Callable[[list[LogRecord] | list[Decoded]], Awaitable[BatchResult | None]]

_LOG_FETCH_WAIT_MS = 50
# A partition held back by a problem is checked again after 5 s, then at doubling intervals up to 60 s.
_RECHECK_S, _RECHECK_MAX_S = 5.0, 60.0
_LAG_REFRESH_S = 5.0  # while a batch is being applied for longer, the log's ends are asked for this often
_FETCH_BYTES = 4 * MAX_EVENT_BYTES  # a record over the limit still arrives, and is dead-lettered as too_large


def _consumer(kafka: Mapping[str, Any], group_id: str | None, *, session_timeout_s: float = 6.0,
              fetch_wait_ms: int = 500) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        **kafka, group_id=group_id, enable_auto_commit=False,
        auto_offset_reset="earliest", max_partition_fetch_bytes=_FETCH_BYTES, fetch_max_bytes=4 * _FETCH_BYTES,
        # Tansu holds a join for half the session timeout of the group's first member.
        session_timeout_ms=round(session_timeout_s * 1000), heartbeat_interval_ms=round(session_timeout_s * 1000 / 3),
        # The embedded broker holds a fetch of an empty partition this long even when records arrive meanwhile:
        # on the log, it bounds how long a new event waits to be read (p99 at 2,000 events/s: 505 ms with 500).
        fetch_max_wait_ms=fetch_wait_ms)


async def _project_until_done(project: Projector, records: list[LogRecord] | list[Decoded],
                              what: str) -> BatchResult | None:
    """``project`` the batch (None: it went to the retry topics whole); an unexpected error is logged and the
    batch tried again: never skipped. TreeBehind is the caller's: the batch must be read again."""
    pause = 1.0
    while True:
        try:
            return await project(records)
        except TreeBehind:
            raise
        except Exception:
            log.exception("%s: a batch of %d records failed unexpectedly; trying it again in %.0f s", what,
                          len(records), pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 30.0)


async def _commit(consumer: AIOKafkaConsumer, fetched: dict[TopicPartition, list[Any]], what: str) -> None:
    offsets = {tp: batch[-1].offset + 1 for tp, batch in fetched.items() if batch}
    try:
        await consumer.commit(offsets)
    except KafkaError as e:  # a rebalance took the partitions away meanwhile: the batch is durable anyway
        log.warning("%s: commit of %s failed (%s: %s); the batch is applied, carrying on", what,
                    {tp.partition: o for tp, o in offsets.items()}, type(e).__name__, e)


class _CheckOnAssign(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: LogConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._owner.assigned_now(assigned)


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A batch handed to the projector, and what to commit to Kafka once it is applied."""

    task: asyncio.Task[BatchResult | None]
    fetched: dict[TopicPartition, list[Any]]
    assignment: int  # the assignment it was read under


class LogConsumer:
    """One consumer-group member of the log: ``run()`` until cancelled. Batch N+1 is read and decoded while
    batch N is applied; N+1 is applied only after N is, and each is committed to Kafka after it is applied."""

    def __init__(self, kafka: Mapping[str, Any], topic: str, group_id: str, store: ProjectionStore,
                 pool: asyncpg.Pool, project: Projector, *, max_records: int = 5000,
                 session_timeout_s: float = 6.0) -> None:
        self.topic, self._group_id = topic, group_id
        self._store, self._pool, self._project, self._max_records = store, pool, project, max_records
        self._consumer = _consumer(kafka, group_id, session_timeout_s=session_timeout_s,
                                   fetch_wait_ms=_LOG_FETCH_WAIT_MS)
        self._checker = _consumer(kafka, None)
        self.held: dict[int, str] = {}  # partitions not projected, and why
        self._checking = asyncio.Lock()  # one check at a time: they share the checker's assignment
        self._newly_held = asyncio.Event()  # a partition is held that was not: check it again soon
        # The lag: per partition, the offset after the last record committed, and the log's end as last seen.
        self._next: dict[int, int] = {}
        self._ends: dict[int, int] = {}
        self._assignment = 0  # counts assignments: a batch read under an earlier one says nothing of the lag now
        self._rewind = False  # records were passed on without their leaves: read again from the stored offsets

    @property
    def assigned(self) -> set[int]:
        return {tp.partition for tp in self._consumer.assignment()}

    async def run(self) -> None:
        await self._consumer.start()
        await self._checker.start()
        self._consumer.subscribe([self.topic], listener=_CheckOnAssign(self))
        in_flight: _InFlight | None = None  # the batch being applied while the next is read and decoded
        recheck = asyncio.create_task(self._recheck_held())
        try:
            while True:
                try:
                    # With a batch in flight, take only what has arrived: its commit must not wait for more.
                    fetched = await self._consumer.getmany(timeout_ms=0 if in_flight else 500,
                                                           max_records=self._max_records)
                except KafkaError as e:
                    log.warning("reading %s: %s; trying again", self.topic, e)
                    await asyncio.sleep(1)
                    continue
                records = [LogRecord(m.topic, m.partition, m.offset, m.key, m.value or b"")
                           for tp, batch in fetched.items() if tp.partition not in self.held for m in batch]
                for tp, batch in fetched.items():  # where projection resumed after an assignment or a seek
                    if batch:
                        self._next.setdefault(tp.partition, batch[0].offset)
                # Decoded while the batch before is still being written: it needs nothing of the tables.
                items = decoded(records)
                if in_flight is not None:
                    try:
                        if await self._applied(in_flight.task) is None:
                            self._rewind = True  # forwarded whole: its records are to be read again as leaves
                    except TreeBehind as e:
                        log.warning("%s; reading the partitions again from where PostgreSQL says", e)
                        self._rewind, in_flight, items = True, None, []
                        continue
                    await _commit(self._consumer, in_flight.fetched, self.topic)
                    if in_flight.assignment == self._assignment:
                        self._projected(in_flight.fetched)
                    in_flight = None
                if self._rewind and await self._read_again():
                    continue  # what was read since is read again, from the stored offsets
                self._observe_lag()
                if items:
                    in_flight = _InFlight(asyncio.create_task(_project_until_done(self._project, items, self.topic)),
                                          fetched, self._assignment)
        finally:
            if in_flight is not None:  # not committed to Kafka: read again, a duplicate where it was applied
                in_flight.task.cancel()
                await asyncio.gather(in_flight.task, return_exceptions=True)
            recheck.cancel()
            await asyncio.gather(recheck, return_exceptions=True)
            await stop_consumer(self._checker)
            await stop_consumer(self._consumer)

    async def _read_again(self) -> bool:
        """After records were passed on without their leaves (a batch forwarded whole, or partitions resumed from
        the group's Kafka offsets while PostgreSQL was away): once PostgreSQL answers, seek every partition back
        to its stored offset, so that every record of the log becomes its tree's next leaf in order. Records
        projected meanwhile from the retry topics are duplicates then. False while PostgreSQL does not answer."""
        try:
            await self._store.load_offsets_and_trees(self.topic)
        except StoreUnavailable:
            return False
        self._rewind = False
        await self._check(list(self._consumer.assignment()))
        return True

    async def _applied(self, task: asyncio.Task[BatchResult | None]) -> BatchResult | None:
        """Wait for a batch to be applied; while it takes long (a lock, PostgreSQL away), the lag goes on
        counting what the log grows by: the fetcher's high watermarks stand still meanwhile."""
        while not (await asyncio.wait({task}, timeout=_LAG_REFRESH_S))[0]:
            try:
                async with asyncio.timeout(_LAG_REFRESH_S):
                    ends = await self._checker.end_offsets(list(self._consumer.assignment()))
            except (KafkaError, TimeoutError) as e:
                log.debug("the log's ends for the lag: %s", e)
                continue
            self._ends.update({tp.partition: end for tp, end in ends.items()})
            self._observe_lag()
        return await task

    def _projected(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        for tp, batch in fetched.items():
            if batch:
                self._next[tp.partition] = batch[-1].offset + 1

    def _observe_lag(self) -> None:
        """Per partition assigned (held back or not), the records the log has beyond what this worker has
        projected (or passed to a retry topic) and committed: a batch that does not commit keeps its records
        in the lag."""
        for tp in self._consumer.assignment():
            end = max(self._consumer.highwater(tp) or 0, self._ends.get(tp.partition, 0))
            done = self._next.get(tp.partition)
            if done is not None:
                metrics.LAG.labels(str(tp.partition)).set(max(end - done, 0))

    async def assigned_now(self, assigned: list[TopicPartition]) -> None:
        """Seek each newly assigned partition to its stored offset, or hold it back if the log does not match."""
        # Paused before the first await: the fetcher may otherwise start from the group's committed offsets.
        self._consumer.pause(*assigned)
        self.held, self._next, self._ends = {}, {}, {}
        self._assignment += 1
        metrics.LAG.clear()  # the partitions held before may be another worker's now
        for tp in assigned:  # born at 0, so that the alert's increase() sees a signer's first finding
            metrics.TREE_DISAGREEMENTS.labels(str(tp.partition))
        log.info("assigned partitions %s of %s", sorted(tp.partition for tp in assigned), self.topic)
        await self._check(assigned, assigned=True)

    async def _recheck_held(self) -> None:
        """Beside the consumer loop, never in it: check the partitions held back again, 5 s after one was newly
        held, then at doubling intervals up to 60 s while any stays held. (A check of a log that ends before the
        stored offset waits 5 s for a record that is not there; in the loop, every healthy partition waited.)"""
        delay = _RECHECK_S
        while True:
            try:
                async with asyncio.timeout(delay):
                    await self._newly_held.wait()
            except TimeoutError:
                delay = min(delay * 2, _RECHECK_MAX_S)
                if held := [TopicPartition(self.topic, p) for p in self.held if p in self.assigned]:
                    try:
                        await self._check(held, assignment=self._assignment)
                    except Exception:  # noqa: BLE001 - a check that fails is tried again, later
                        log.exception("checking the partitions held back of %s failed; trying again in %.0f s",
                                      self.topic, delay)
            else:
                self._newly_held.clear()
                delay = _RECHECK_S

    def _hold(self, partition: int, why: str) -> None:
        if partition not in self.held:
            self._newly_held.set()  # its first check again comes soon, whatever the others' interval
        self.held[partition] = why

    async def _check(self, tps: list[TopicPartition], *, assigned: bool = False,
                     assignment: int | None = None) -> None:
        """Seek and resume ``tps`` whose log matches; hold back the others. ``assigned``: just assigned;
        ``assignment``: checked under that assignment only (an assignment since checks its partitions itself)."""
        async with self._checking:
            await self._check_now(tps, assigned=assigned, assignment=assignment)

    async def _check_now(self, tps: list[TopicPartition], *, assigned: bool, assignment: int | None) -> None:
        if not tps:
            self.held = {}
            return
        try:
            stored, trees = await self._store.load_offsets_and_trees(self.topic)
        except StoreUnavailable as e:
            if assigned:  # The group's Kafka offsets are never ahead of what is projected or in a retry topic.
                log.warning("%s; starting from the group's committed offsets", e)
                self._rewind = True  # and back to the stored ones once PostgreSQL answers: the trees need them
                with contextlib.suppress(IllegalStateError, AssertionError):
                    self._consumer.resume(*(tp for tp in tps if tp.partition in self.assigned))
            return
        try:
            checks = await check_partitions(self._checker, self.topic, [tp.partition for tp in tps], stored,
                                            trees=trees)
        except (KafkaError, TimeoutError) as e:
            if assignment in (None, self._assignment):
                log.warning("cannot check partitions %s of %s against the stored offsets (%s); holding them back "
                            "until it can", [tp.partition for tp in tps], self.topic, e or type(e).__name__)
                for tp in tps:
                    self._hold(tp.partition, f"not checked yet: {e or type(e).__name__}")
            return
        if assignment not in (None, self._assignment):
            return  # the group rebalanced while we looked: the new assignment's own check decides
        current = self.assigned  # the group may have rebalanced while we looked
        for check in (c for c in checks if c.partition in current):
            tp = TopicPartition(self.topic, check.partition)
            # Projected up to the stored offset (none stored: nothing yet); the lag counts from there.
            self._next[check.partition] = check.stored if check.stored is not None else check.start
            self._ends[check.partition] = check.end
            try:
                if check.problem is not None:
                    if check.partition not in self.held:
                        log.error("not projecting %s partition %d: %s; %s", self.topic, check.partition,
                                  check.problem, check.fix)
                    self._hold(check.partition, check.problem)
                    self._consumer.pause(tp)
                    continue
                # None stored: from the log's start, which is offset 0 (any other start is a problem above), never
                # from wherever the broker's earliest offset or the group's committed offset would put it.
                self._consumer.seek(tp, check.stored if check.stored is not None else check.start)
                self._consumer.resume(tp)
            except (IllegalStateError, AssertionError) as e:  # taken away meanwhile: its new owner checks it
                log.info("partition %d of %s changed hands during its check: %s", check.partition, self.topic, e)
                continue
            if self.held.pop(check.partition, None) is not None:
                log.warning("projecting %s partition %d again from offset %s", self.topic, check.partition,
                            check.stored)
        partitions = len(self._consumer.partitions_for_topic(self.topic) or ()) or len(checks)
        try:
            await save_problems(self._pool, self._group_id, partitions, checks)
        except Exception as e:
            log.warning("cannot record the partitions held back in PostgreSQL: %s", database_error(e, "") or e)


class RetryConsumer:
    """Reads one retry topic: waits until each batch is due, then projects it. ``run()`` until cancelled."""

    def __init__(self, kafka: Mapping[str, Any], topic: str, delay: float, group_id: str,
                 project: Projector, *, session_timeout_s: float = 6.0) -> None:
        self.topic, self._delay, self._project = topic, delay, project
        self._consumer = _consumer(kafka, group_id, session_timeout_s=session_timeout_s)
        self._depth = metrics.RETRY_DEPTH.labels(delay_name(delay))

    async def run(self) -> None:
        await self._consumer.start()
        self._consumer.subscribe([self.topic])
        try:
            while True:
                try:
                    fetched = await self._consumer.getmany(timeout_ms=500, max_records=1000)
                except KafkaError as e:
                    log.warning("reading %s: %s; trying again", self.topic, e)
                    await asyncio.sleep(1)
                    continue
                batch = [from_retry_topic(m.topic, m.partition, m.offset, m.key, m.value or b"", m.headers or [],
                                          message_time(m.timestamp), self._delay)
                         for messages in fetched.values() for m in messages]
                behind = sum(max((self._consumer.highwater(tp) or 0) - messages[-1].offset - 1, 0)
                             for tp, messages in fetched.items() if messages)
                self._depth.set(behind + len(batch))
                if not batch:
                    continue
                # A topic's records fall due in the order they were written: wait for the last one. Cancelled
                # here, nothing is committed, and the records are read again after a restart.
                wait = (max(due for _, due in batch) - datetime.now(UTC)).total_seconds()
                log.info("%s: %d records, due in %.1f s", self.topic, len(batch), max(wait, 0.0))
                if wait > 0:
                    await asyncio.sleep(min(wait, self._delay))
                await _project_until_done(self._project, [record for record, _ in batch], self.topic)
                await _commit(self._consumer, fetched, self.topic)
                self._depth.set(behind)
        finally:
            await stop_consumer(self._consumer)
