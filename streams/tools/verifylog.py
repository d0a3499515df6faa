"""``runledger verify log``: the log topic checked by itself, and PostgreSQL checked against it.

Reads every partition of ``<prefix>.events`` from its start up to where it ends when the check starts (so the
check ends while producers keep appending), with a consumer of no group that commits nothing, and:

- hands every record to the pure ``LogAuditor``: every hash and link of the log recomputed from its records;
- compares PostgreSQL with it, partition by partition (``PartitionComparer``), from one snapshot taken before
  the log is read: every ``audit_log`` row must be, byte for byte, the record at the log position it records, and
  name that record's leaf; the partition's stored tree must be the tree of its records; and every record before
  where the partition was projected to must be accounted for: in ``audit_log``, a duplicate of an event there
  (same id and hash), a dead letter (open or resolved), or parked. Each finding names stream, seq and event id,
  or partition and offset.

``verify --checkpoint FILE`` (``verify_checkpoint``) reads one partition up to a signed checkpoint's size and
compares the root with the signed one, and the partition's audit rows under it with the records.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from runledger.projections.postgres.db import connect_one
from runledger.projections.postgres.queries import query
from runledger.projections.postgres.trees import stored_trees
from runledger.projections.postgres.verify import ChainReport
from runledger.schemas.checkpoint import Checkpoint
from runledger.schemas.errors import PermanentError, TransientError
from runledger.schemas.events import Event, decode_event, parse_event
from runledger.schemas.logtrees import PartitionComparer
from runledger.schemas.merkle import EMPTY_ROOT
from runledger.schemas.verify import Finding, LogAuditor
from runledger.streams.kafka import client_options, read_to_end, stop_consumer
from runledger.streams.settings import Settings
from runledger.streams.worker.retry import HEADER, RetrySchedule, delay_name

__all__ = ["LogMissing", "LogReport", "verify_checkpoint", "verify_log"]

_FETCH = 10_000  # records one fetch returns at most
_STALLED_S = 60.0  # no record for this long while a partition is not read to its end: give up

Progress = Callable[[int, int], None]


class LogMissing(PermanentError):
    """The log topic does not exist: check that RUNLEDGER_KAFKA_BOOTSTRAP_SERVERS and RUNLEDGER_TOPIC_PREFIX name
    the deployment whose log is to be checked."""

    code = "log_missing"


@dataclass(slots=True)
class LogReport(ChainReport):
    """A chain report of the log topic, with the records read, how many of its events were retried copies, and
    how many records PostgreSQL was compared with."""

    records: int = 0
    duplicates: int = 0
    compared: int = 0
    in_flight: int = 0  # records not projected yet but on their way through the retry topics

    def as_dict(self) -> dict[str, Any]:
        return {**ChainReport.as_dict(self), "records": self.records, "duplicates": self.duplicates,
                "compared": self.compared, "in_flight": self.in_flight}


class _Snapshot:
    """What PostgreSQL holds of the log, read in one repeatable-read transaction on ``conn``."""

    def __init__(self, conn: asyncpg.Connection, settings: Settings,
                 in_flight: Callable[[], Awaitable[set[tuple[int, int]]]] | None = None) -> None:
        self.conn, self.topic, self.group = conn, settings.events_topic, settings.consumer_group
        self.in_flight, self.flying = in_flight, 0

    async def open(self, partitions: list[int]) -> list[Finding]:
        self.trees = await stored_trees(self.conn, self.topic)
        self.offsets = {r["partition"]: r["next_offset"]
                        for r in await self.conn.fetch(query("load_offsets"), self.group, self.topic)}
        return [Finding(r["stream_id"], r["seq"], r["event_id"], "audit_not_in_log",
                        f"audit_log row at {r['kafka_topic']} partition {r['kafka_partition']} offset "
                        f"{r['kafka_offset']}: that is no position of the log topic {self.topic}",
                        r["kafka_partition"], r["kafka_offset"])
                for r in await self.conn.fetch(query("audit_elsewhere"), self.topic, partitions)]

    async def comparer(self, partition: int, limit: int | None = None) -> PartitionComparer:
        rows = await self.conn.fetch(query("audit_at_positions"), self.topic, partition)  # read as AuditRow
        tree = self.trees.get(partition)
        return PartitionComparer(self.topic, partition, rows, tree.id if tree else None, tree.size if tree else 0,
                                 tree.root if tree else EMPTY_ROOT, limit)

    async def finish(self, comparer: PartitionComparer, read_to: int) -> list[Finding]:
        """The comparer's findings, the first stored leaf that differs if the root does, and the records no audit
        row holds that are not accounted for."""
        findings = list(comparer.finish(read_to))
        if wrong := comparer.wrong_rows:
            findings += comparer.row_findings(await self.conn.fetch(query("audit_names_at"), self.topic,
                                                                    comparer.partition, wrong))
        tree = self.trees.get(comparer.partition)
        # The stored leaves are read only if the root folded from the stored peaks, or a digest of the stored
        # leaves (a leaf changed under unchanged peaks), is not the records'.
        if tree is not None and comparer.limit is None and (comparer.root_differs or tuple(await self.conn.fetchrow(
                query("tree_leaves_digest"), tree.id)) != comparer.leaves_digest()):
            differing = comparer.first_leaf_differing(
                tuple(r) for r in await self.conn.fetch(query("tree_leaves"), tree.id))
            findings += [differing] if differing is not None else []
        to = self.projected_to(comparer.partition)
        return findings + await self.account(comparer.partition, [u for u in comparer.unmatched if u[0] < to])

    def projected_to(self, partition: int) -> int:
        tree = self.trees.get(partition)
        return max(int(self.offsets.get(partition, 0)), tree.next_offset if tree else 0)

    async def account(self, partition: int, unmatched: list[tuple[int, bytes]]) -> list[Finding]:
        """The records no audit row holds at their position: each must be a duplicate, a dead letter or parked."""
        if not unmatched:
            return []
        offsets = [o for o, _ in unmatched]
        # A letter or a parked event explains a record only if it holds the record's bytes.
        held = {(r["offset"], bytes(r["value"])) for r in await self.conn.fetch(
            query("letters_at_positions"), self.topic, partition, offsets) if r["value"] is not None}
        unmatched = [(o, v) for o, v in unmatched if (o, v) not in held]
        if unmatched and self.in_flight is not None:  # on their way through the retry topics: not a finding yet
            flying = await self.in_flight()
            self.flying += sum((partition, o) in flying for o, _ in unmatched)
            unmatched = [(o, v) for o, v in unmatched if (partition, o) not in flying]
        events: dict[int, Event | PermanentError] = {}
        for offset, value in unmatched:
            try:
                events[offset] = parse_event(decode_event(value))
            except PermanentError as e:
                events[offset] = e
        ids = [e.id for e in events.values() if not isinstance(e, PermanentError)]
        projected = {r["event_id"]: r for r in await self.conn.fetch(query("audit_by_ids"), ids)} if ids else {}
        findings = []
        for offset, event in sorted(events.items()):
            if isinstance(event, PermanentError):
                findings.append(Finding("", None, None, "record_unaccounted", f"{self.topic} partition {partition} "
                                        f"offset {offset}: not an event ({event.code}: {event}), and no dead letter "
                                        "holds it", partition, offset))
                continue
            twin = projected.get(event.id)
            if twin is not None and twin["hash"] == event.hash:
                continue  # a duplicate of a projected event
            why = (f"its id is projected with another hash, in {twin['stream_id']} seq {twin['seq']}, and no "
                   "id_conflict letter holds it" if twin is not None else
                   "not in audit_log, not a duplicate, no dead letter and not parked: the event was deleted")
            findings.append(Finding(event.subject, event.seq, event.id, "record_unaccounted",
                                    f"{self.topic} partition {partition} offset {offset}: {why}", partition, offset))
        return findings


class _InFlight:
    """The log positions of the records on their way through the retry topics now (read once, when first
    asked): the copies in the outbox not published yet, and those in each retry topic past where its consumer
    group committed. A record there is neither projected nor a dead letter yet, and is no finding."""

    def __init__(self, settings: Settings, conn: asyncpg.Connection, consumer: AIOKafkaConsumer) -> None:
        self.settings, self.conn, self.consumer = settings, conn, consumer
        self.positions: set[tuple[int, int]] | None = None

    async def __call__(self) -> set[tuple[int, int]]:
        if self.positions is None:
            self.positions = await self._read()
        return self.positions

    async def _read(self) -> set[tuple[int, int]]:
        topic, settings = self.settings.events_topic, self.settings
        found = {(r["partition"], r["offset"]) for r in await self.conn.fetch(query("outbox_positions"), topic)}
        schedule = RetrySchedule(settings.topic_prefix, settings.retry_delays)
        cluster = await self.consumer._client.fetch_all_metadata()  # noqa: SLF001 - every topic
        for delay, retry_topic in schedule.topics:
            tps = [TopicPartition(retry_topic, p) for p in sorted(cluster.partitions_for_topic(retry_topic) or ())]
            if not tps:
                continue
            committed = await _committed(settings, f"{settings.consumer_group}.retry.{delay_name(delay)}", tps)
            self.consumer.assign(tps)
            starts = await self.consumer.beginning_offsets(tps)
            for tp in tps:
                self.consumer.seek(tp, max(committed.get(tp) or 0, starts[tp]))

            def take(_: TopicPartition, messages: list[Any]) -> None:
                for m in messages:
                    h = {k: v.decode("utf-8", "replace") for k, v in m.headers or () if v}
                    with contextlib.suppress(KeyError, ValueError):
                        if h[f"{HEADER}original.topic"] == topic:
                            found.add((int(h[f"{HEADER}original.partition"]), int(h[f"{HEADER}original.offset"])))

            await read_to_end(self.consumer, tps, take, stalled_s=_STALLED_S, max_records=_FETCH)
        return found


async def _committed(settings: Settings, group: str, tps: list[TopicPartition]) -> dict[TopicPartition, int | None]:
    """The offsets ``group`` committed on ``tps``, asked without joining it (a consumer assigned, never
    subscribed, commits nothing)."""
    consumer = AIOKafkaConsumer(**client_options(settings), group_id=group,
                                enable_auto_commit=False)
    try:
        await consumer.start()
        consumer.assign(tps)
        return {tp: await consumer.committed(tp) for tp in tps}
    finally:
        await stop_consumer(consumer)


def _consumer(settings: Settings) -> AIOKafkaConsumer:
    # auto_offset_reset="none": records deleted while they are read fail the check instead of being skipped.
    return AIOKafkaConsumer(**client_options(settings), group_id=None,
                            enable_auto_commit=False, auto_offset_reset="none",
                            max_partition_fetch_bytes=4 * 1024 * 1024)


async def _partitions(consumer: AIOKafkaConsumer, settings: Settings) -> list[TopicPartition]:
    await consumer._client.force_metadata_update()  # noqa: SLF001 - every topic: this consumer subscribes none
    partitions = consumer.partitions_for_topic(settings.events_topic)
    if not partitions:
        raise LogMissing(f"topic {settings.events_topic} does not exist at {settings.kafka_bootstrap_servers}")
    return [TopicPartition(settings.events_topic, p) for p in sorted(partitions)]


async def verify_log(settings: Settings, progress: Progress | None = None, *, database: bool = True) -> LogReport:
    """Check the log topic, and PostgreSQL against it unless ``database`` is false (module docstring).

    ``progress``: called with (records read, records to read). Raises LogMissing if the topic does not exist,
    TransientError if Kafka cannot be read.
    """
    report = LogReport()
    started, cpu = time.perf_counter(), time.process_time()
    auditor = LogAuditor()
    consumer = _consumer(settings)
    conn = await connect_one(settings.database_dsn(), settings.db_schema) if database else None
    try:
        await consumer.start()
        tps = await _partitions(consumer, settings)
        starts = await consumer.beginning_offsets(tps)
        total = sum((await consumer.end_offsets(tps)).values()) - sum(starts.values())
        snapshot = None
        if conn is not None:
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            snapshot = _Snapshot(conn, settings, _InFlight(settings, conn, consumer))
            report.findings += await snapshot.open([tp.partition for tp in tps])
        # One partition at a time (PostgreSQL's rows of two partitions in memory): the next one's rows are read
        # while this one's records are.
        comparer = await snapshot.comparer(tps[0].partition) if snapshot is not None else None
        for i, tp in enumerate(tps):
            if starts[tp] > 0:
                report.findings.append(Finding(
                    "", None, None, "log_start_deleted", f"partition {tp.partition} starts at offset {starts[tp]}: "
                    "the records before it were deleted (retention), so its streams cannot be checked from their "
                    "start", tp.partition, starts[tp]))
            following = (asyncio.ensure_future(snapshot.comparer(tps[i + 1].partition))
                         if snapshot is not None and i + 1 < len(tps) else None)
            consumer.assign([tp])
            consumer.seek(tp, starts[tp])

            def take(_: TopicPartition, messages: list[Any], comparer: PartitionComparer | None = comparer) -> None:
                report.findings.extend(auditor.check(messages))
                if comparer is not None:
                    comparer.feed(messages)
                if progress is not None:
                    progress(auditor.records, total)

            try:
                ends = await read_to_end(consumer, [tp], take, stalled_s=_STALLED_S, max_records=_FETCH)
                after = await following if following is not None else None
            finally:
                if following is not None and not following.done():
                    following.cancel()
            if comparer is not None and snapshot is not None:
                report.findings += await snapshot.finish(comparer, ends.get(tp, starts[tp]))
                report.compared += comparer.size
            comparer = after
        report.in_flight = snapshot.flying if snapshot is not None else 0
        report.findings += auditor.finish()
    except KafkaError as e:
        raise TransientError(f"cannot read {settings.events_topic} at {settings.kafka_bootstrap_servers}: {e}") from e
    except asyncpg.UndefinedTableError:
        raise PermanentError(f"schema {settings.db_schema} has no projection tables (migration 012 or later): run "
                             "`runledger db migrate`, or check the log alone with --no-database") from None
    finally:
        await stop_consumer(consumer)
        if conn is not None:
            await conn.close()
    report.events, report.streams = auditor.events, auditor.streams
    report.records, report.duplicates = auditor.records, auditor.duplicates
    report.seconds, report.cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    return report


async def verify_checkpoint(settings: Settings, checkpoint: Checkpoint, partition: int,
                            progress: Progress | None = None) -> LogReport:
    """Is the partition's log the one ``checkpoint`` signed (its first ``size`` records give its root), and are
    PostgreSQL's events under it those records?"""
    report = LogReport()
    started, cpu = time.perf_counter(), time.process_time()
    consumer = _consumer(settings)
    conn = await connect_one(settings.database_dsn(), settings.db_schema)
    try:
        await consumer.start()
        tps = await _partitions(consumer, settings)
        tp = TopicPartition(settings.events_topic, partition)
        if tp not in tps:
            raise LogMissing(f"{settings.events_topic} has no partition {partition}")
        await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snapshot = _Snapshot(conn, settings, _InFlight(settings, conn, consumer))
        await snapshot.open([p.partition for p in tps])
        comparer = await snapshot.comparer(partition, limit=checkpoint.size)
        consumer.assign([tp])
        consumer.seek(tp, (await consumer.beginning_offsets([tp]))[tp])

        def take(_: TopicPartition, messages: list[Any]) -> None:
            comparer.feed(messages)
            if progress is not None:
                progress(comparer.size, checkpoint.size)

        ends = await read_to_end(consumer, [tp], take, stalled_s=_STALLED_S, max_records=_FETCH)
        report.findings += await snapshot.finish(comparer, ends.get(tp, 0))
        size = comparer.size
        if size < checkpoint.size:
            report.findings.append(Finding("", None, None, "log_shorter", f"partition {partition} holds {size:,} "
                                           f"records, the checkpoint signed {checkpoint.size:,}: records were "
                                           "deleted", partition))
        elif (root := comparer.root(size)) != checkpoint.root:
            report.findings.append(Finding("", None, None, "root_mismatch", f"partition {partition}'s first "
                                           f"{size:,} records have root {root.hex()}, the "
                                           f"checkpoint signed {checkpoint.root.hex()}: the log was rewritten",
                                           partition))
        report.compared = report.records = report.events = size
    except KafkaError as e:
        raise TransientError(f"cannot read {settings.events_topic} at {settings.kafka_bootstrap_servers}: {e}") from e
    finally:
        await stop_consumer(consumer)
        await conn.close()
    report.seconds, report.cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    return report
