"""``runledger rebuild``: re-project the whole log into fresh tables, prove them equal, then switch them in.

1. A schema ``<live>_rebuild_<time>`` gets the migrations and the price catalog; a consumer of its own (no
   group, ``auto_offset_reset="none"``) reads every partition from offset 0 and applies batches exactly as a
   worker does, saving its offsets with them. An interrupted rebuild resumes from those offsets when run
   again (``fresh`` starts over), unless the rules' code changed since it began, or it is incomplete: then it
   starts over. A log whose start was deleted is refused: it no longer holds the history. One rebuild of a
   schema runs at a time.
2. Comparison, without stopping anyone: in a snapshot of the live schema (a repeatable-read transaction:
   projections and offsets commit together, so any snapshot is consistent) the rebuild applies exactly up to
   the snapshot's offsets and checksums every table of both, streaming. Then, round after round, it catches
   up with a newer snapshot and compares only the streams the records since the last round touched, until a
   round is small.
3. Switch-over, in one short transaction: take the live schema's apply lock exclusively (workers pause
   between batches) with a lock timeout, apply the last few records, compare the streams they touched, check
   that both audit logs have the same size, and move the tables in: the live derived tables
   (executions, steps, costs, artifacts, stream heads) to ``<live>_retired_<time>`` (kept), the rebuilt ones
   into the live schema. The whole section has a time limit; past it, it is rolled back and tried again, so
   workers never wait on it for more than about a second.

Whatever stops a read of the log midway (that time limit, an interruption, an error) seeks every partition back
to where the rebuild has applied it: the records fetched and not applied are read again, never skipped.

Everything else stays where it is, in the live schema: the audit log with its transparency logs and
checkpoints (so earlier checkpoints still verify), the dead letters with their resolutions and notes, the
replay history, the parked events, the outbox and the offsets. So the audit log must be equal: ``force``
switches when only derived tables differ (after a deliberate change of the projection rules), never when the
events projected differ. If anything differs nothing is switched and the rebuilt schema stays for inspection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, OffsetOutOfRangeError

from runledger.projections.postgres.attestations import fingerprint
from runledger.projections.postgres.checksum import table_checksums
from runledger.projections.postgres.db import connect, connect_one, migrate
from runledger.projections.postgres.queries import query, quote_schema
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.pricing import load_tokencost_catalog
from runledger.projections.records import LogRecord
from runledger.schemas.errors import PermanentError, TransientError
from runledger.streams.kafka import client_options, stop_consumer
from runledger.streams.settings import Settings
from runledger.streams.worker.logcheck import Stored, check_partitions

__all__ = ["DERIVED_TABLES", "RebuildFailed", "RebuildReport", "rebuild"]

log = logging.getLogger(__name__)

DERIVED_TABLES = ("executions", "steps", "costs", "artifacts", "stream_heads")
"""What a switch-over replaces: the tables the rules derive from the audit log. The rest stays, parked events
too: they wait on what the live workers do with gaps (retry topics, dead letters), which a rebuild, parking
every gap, does not."""

# Records fetched and applied at a time.
_FETCH_RECORDS = 5000
# Compare again with a newer snapshot until a round applies fewer records than this.
_SMALL_ROUND = 2000
# At most this many records are applied under the exclusive lock; more, and it is released for another round.
_LOCKED_RECORDS = 1000
# The exclusive section: how long to wait for the lock, and how long to hold it at most (rolled back past it).
_LOCK_WAIT_S, _LOCK_HOLD_S, _SWITCH_TRIES = 0.3, 0.8, 20

Progress = Callable[[int, int], None]
"""Called with (records applied so far, records to apply as far as known)."""


class RebuildFailed(PermanentError):
    """The log cannot be re-projected completely (for example, retention deleted its start)."""

    code = "rebuild_failed"


class _TryAgain(Exception):
    """The exclusive section would run too long: roll it back and catch up first."""


@dataclass(slots=True)
class RebuildReport:
    """What a rebuild did; ``checksums``: table -> (live (rows, md5), rebuilt (rows, md5)) at the full
    comparison; ``differing``: tables that differ there or in a later round."""

    live_schema: str
    rebuilt_schema: str
    retired_schema: str | None
    records: int
    seconds: float
    resumed_from: int = 0
    checksums: dict[str, tuple[tuple[int, str], tuple[int, str]]] = field(default_factory=dict)
    differing: set[str] = field(default_factory=set)
    rounds: int = 0
    switch_tries: int = 0
    lock_held_s: float | None = None
    switched: bool = False

    @property
    def equal(self) -> bool:
        return not self.differing

    def as_dict(self) -> dict[str, Any]:
        return {
            "live_schema": self.live_schema, "rebuilt_schema": self.rebuilt_schema,
            "retired_schema": self.retired_schema, "records": self.records, "resumed_from": self.resumed_from,
            "seconds": round(self.seconds, 3), "rounds": self.rounds, "switch_tries": self.switch_tries, "lock_held_s":
            None if self.lock_held_s is None else round(self.lock_held_s, 3), "equal": self.equal,
            "switched": self.switched,
            "tables": {t: {"live_rows": lv[0], "live_md5": lv[1], "rebuilt_rows": rb[0], "rebuilt_md5": rb[1],
                           "equal": t not in self.differing} for t, (lv, rb) in self.checksums.items()},
        }

    def compare(self, live: dict[str, tuple[int, str]], rebuilt: dict[str, tuple[int, str]]) -> None:
        self.differing |= {table for table in live if live[table] != rebuilt[table]}


class _Follower:
    """Reads the log partition by partition and applies it to the rebuilt schema, never past a target."""

    def __init__(self, consumer: AIOKafkaConsumer, store: ProjectionStore, topic: str,
                 progress: Progress | None) -> None:
        self._consumer, self._store, self._topic, self._progress = consumer, store, topic, progress
        self.positions: dict[int, int] = {}
        self.applied = 0
        self.touched: set[str] = set()  # streams projected since the last ``take_touched``

    async def start(self, stored: Stored, live: Stored) -> None:
        """From offset 0, or from where a rebuild that was interrupted stopped (``stored``: its saved offsets).

        Refuses a log that no longer holds what the live tables (``live``: their offsets) or the interrupted
        rebuild projected (recreated or emptied since), or whose start was deleted (the history is gone)."""
        partitions = sorted(self._consumer.partitions_for_topic(self._topic) or set())
        fresh = " (`runledger rebuild --fresh` starts over)" if stored else ""
        if missing := sorted((set(stored) | set(live)) - set(partitions)):
            raise RebuildFailed(f"partitions {missing} of {self._topic} were projected, and the topic no longer has "
                                f"them: it was recreated or emptied since{fresh}")
        for offsets, suffix in (({p: stored.get(p, (0, None)) for p in partitions}, fresh),
                                (live, "; the live workers stop on it too (see `runledger offsets check`)")):
            # The trees are not checked: the rebuilt schema grows its own from offset 0.
            for check in await check_partitions(self._consumer, self._topic, partitions, offsets, trees=None):
                if check.problem is not None:
                    raise RebuildFailed(check.problem + suffix)
        tps = [TopicPartition(self._topic, p) for p in partitions]
        self._consumer.assign(tps)
        for tp in tps:
            self.positions[tp.partition] = position = stored.get(tp.partition, (0, None))[0]
            self._consumer.seek(tp, position)

    def take_touched(self) -> list[str]:
        touched, self.touched = sorted(self.touched), set()
        return touched

    async def follow(self, targets: dict[int, int]) -> int:
        """Apply every record below ``targets`` (partition -> offset). Returns how many were applied."""
        if unknown := sorted(p for p in set(targets) - set(self.positions) if targets[p] > 0):
            raise RebuildFailed(f"the live offsets name partitions {unknown} that {self._topic} does not have: the "
                                "log topic was recreated or emptied since (see `runledger offsets check`)")
        before = self.applied
        self._report(targets)
        try:
            while behind := [TopicPartition(self._topic, p) for p, end in sorted(targets.items())
                             if self.positions.get(p, 0) < end]:
                await self._follow_once(behind, targets)
        except BaseException:
            # A time limit, an interruption or an error may come after getmany moved the consumer past records
            # not applied: read them again next time, or they would be a hole no later round fills.
            self._seek_back()
            raise
        return self.applied - before

    async def _follow_once(self, behind: list[TopicPartition], targets: dict[int, int]) -> None:
        """One fetch of the partitions ``behind``, and the apply of what it brought below ``targets``."""
        try:
            fetched = await self._consumer.getmany(*behind, timeout_ms=1000, max_records=_FETCH_RECORDS)
        except OffsetOutOfRangeError as e:
            raise RebuildFailed(f"{self._topic}: records were deleted while the rebuild read them ({e}), so the "
                                "log no longer holds the whole history") from e
        if not fetched:
            self._check_reachable(behind, targets)
        records = []
        for tp, messages in fetched.items():
            end = targets[tp.partition]
            records += [LogRecord(m.topic, m.partition, m.offset, m.key, m.value or b"")
                        for m in messages if m.offset < end]
            if messages and messages[-1].offset >= end:
                self._consumer.seek(tp, end)  # fetched past the target: read it again next round
        if records:
            result = await self._store.apply_until_done(records)
            self.touched.update(stream for stream, _ in result.projected)
            for r in records:
                self.positions[r.partition] = r.offset + 1
            self.applied += len(records)
            self._report(targets)

    def _seek_back(self) -> None:
        """Every partition back to where it is applied up to. (A batch committed just before a cancellation
        reached it is applied once more: its records are duplicates, and the tree takes no leaf twice.)"""
        for partition, position in self.positions.items():
            self._consumer.seek(TopicPartition(self._topic, partition), position)

    def _check_reachable(self, behind: list[TopicPartition], targets: dict[int, int]) -> None:
        """Nothing came: refuse to wait for ever for offsets the log does not have. (The high watermark of a
        fetch, not ListOffsets' end, which the embedded broker reports short.)"""
        for tp in behind:
            end = self._consumer.highwater(tp)
            if end is not None and end < targets[tp.partition]:
                raise RebuildFailed(f"the live tables were projected from {tp.topic} partition {tp.partition} up to "
                                    f"offset {targets[tp.partition]}, but the log ends at offset {end}: it was "
                                    "recreated or emptied (see `runledger offsets check`)")

    def _report(self, targets: dict[int, int]) -> None:
        if self._progress is not None:
            todo = sum(max(end - self.positions.get(p, 0), 0) for p, end in targets.items())
            self._progress(self.applied, self.applied + todo)


async def _live_stored(conn: asyncpg.Connection, settings: Settings) -> Stored:
    rows = await conn.fetch(query("load_offsets"), settings.consumer_group, settings.events_topic)
    return {r["partition"]: (r["next_offset"], r["last_sha256"]) for r in rows}


async def _live_offsets(conn: asyncpg.Connection, settings: Settings) -> dict[int, int]:
    return {partition: offset for partition, (offset, _) in (await _live_stored(conn, settings)).items()}


async def rebuild(settings: Settings, *, force: bool = False, switch: bool = True, fresh: bool = False,
                  progress: Progress | None = None) -> RebuildReport:
    """Rebuild ``settings.db_schema`` from the log; see the module docstring.

    ``force``: switch even if a derived table differs. ``switch=False``: build and compare only (the rebuilt
    schema is kept, and a later rebuild resumes it). ``fresh``: drop an interrupted rebuild and start over.
    """
    live = settings.db_schema
    started = time.monotonic()
    owner = await connect_one(settings.database_dsn(), live)
    try:
        if not await owner.fetchval("SELECT to_regclass('consumer_offsets') IS NOT NULL"):
            raise RebuildFailed(f"schema {live} has no projection tables to rebuild; run a worker or "
                                "`runledger db migrate` first")
        if not await owner.fetchval(query("rebuild_lock"), live):
            raise RebuildFailed(f"another `runledger rebuild` of schema {live} is running; wait for it to end")
        rebuilt = await _resume_or_create(owner, settings, fresh=fresh)
        try:
            report = await _rebuild_into(owner, settings, rebuilt, force=force, switch=switch, progress=progress)
        except BaseException:
            log.warning("rebuild stopped; %s is kept: `runledger rebuild` resumes it, `--fresh` drops it", rebuilt)
            raise
        if report.switched:  # its derived tables were moved in; what is left is a copy of the live rest
            await owner.execute(f"DROP SCHEMA {quote_schema(rebuilt)} CASCADE")
    finally:
        await owner.close()
    report.seconds = time.monotonic() - started
    return report


async def _resume_or_create(owner: asyncpg.Connection, settings: Settings, *, fresh: bool) -> str:
    """The newest rebuild schema of the live one to resume, or a new one, migrated and with the catalog.

    A schema is resumed only if it is complete (its comment is set last, once it holds the migrations and the
    catalog, and it still has every derived table: after a switch it has none) and was built by rules of the
    same code: rows of two versions of the rules would otherwise be mixed."""
    live = settings.db_schema
    earlier = await owner.fetch(query("rebuild_schemas"), live.replace("_", r"\_") + r"\_rebuild\_%",
                                list(DERIVED_TABLES))
    rules = fingerprint()
    if earlier and not fresh:
        newest = earlier[0]
        if newest["comment"] == rules and newest["derived"] == len(DERIVED_TABLES):
            await migrate(settings.database_dsn(), newest["nspname"])  # the migrations added since it began, if any
            return str(newest["nspname"])
        log.warning("%s is not resumed: %s; starting over", newest["nspname"],
                    "the rules' code changed since it began" if newest["derived"] == len(DERIVED_TABLES)
                    and newest["comment"] else "it is incomplete")
    for row in earlier:
        await owner.execute(f"DROP SCHEMA {quote_schema(row['nspname'])} CASCADE")
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    rebuilt = f"{live}_rebuild_{stamp}"
    quote_schema(f"{live}_retired_{stamp}")  # a name too long for PostgreSQL fails here, before any work
    await migrate(settings.database_dsn(), rebuilt)
    pool = await connect(settings.database_dsn(), rebuilt)
    try:
        await ProjectionStore.save_catalog(pool, load_tokencost_catalog())
    finally:
        await pool.close()
    await owner.execute(f"COMMENT ON SCHEMA {quote_schema(rebuilt)} IS {_literal(rules)}")
    return rebuilt


def _literal(text: str) -> str:
    """A hex digest as an SQL literal (COMMENT takes no parameter)."""
    if not text.isalnum():
        raise ValueError(f"not a digest: {text!r}")
    return f"'{text}'"


async def _rebuild_into(owner: asyncpg.Connection, settings: Settings, rebuilt: str, *, force: bool, switch: bool,
                        progress: Progress | None) -> RebuildReport:
    report = RebuildReport(settings.db_schema, rebuilt, None, 0, 0.0)
    pool = await connect(settings.database_dsn(), rebuilt)
    snapshot = await connect_one(settings.database_dsn(), settings.db_schema)
    consumer = AIOKafkaConsumer(**client_options(settings), group_id=None,
                                enable_auto_commit=False, auto_offset_reset="none",
                                max_partition_fetch_bytes=4 * 1024 * 1024)
    try:
        catalog = await ProjectionStore.load_catalog(pool)
        assert catalog is not None  # stored when the schema was made
        store = ProjectionStore(pool, catalog, settings.consumer_group)
        await consumer.start()
        follower = _Follower(consumer, store, settings.events_topic, progress)
        stored = await store.load_offsets(settings.events_topic)
        report.resumed_from = sum(offset for offset, _ in stored.values())
        await follower.start(stored, await _live_stored(owner, settings))
        rounds = _Rounds(owner, snapshot, settings, rebuilt, follower, report)
        while await follower.follow(await _live_offsets(owner, settings)) >= _SMALL_ROUND:
            pass  # catch up before the first snapshot, without comparing
        while await rounds.compare() >= _SMALL_ROUND or report.rounds < 2:
            pass
        if switch and (report.equal or (force and "audit_log" not in report.differing)):
            await _copy_catalogs(owner, rebuilt)
            await _switch(rounds, force=force)
        report.records = follower.applied
    except KafkaError as e:
        raise TransientError(f"reading {settings.events_topic}: {e}") from e
    finally:
        await stop_consumer(consumer)
        await snapshot.close()
        await pool.close()
    return report


@dataclass(slots=True)
class _Rounds:
    """The comparison rounds of one rebuild (see the module docstring, step 2)."""

    owner: asyncpg.Connection
    snapshot: asyncpg.Connection  # on the live schema, for the repeatable-read snapshots
    settings: Settings
    rebuilt: str
    follower: _Follower
    report: RebuildReport

    async def compare(self) -> int:
        """One round: apply up to a new snapshot of the live offsets and compare every row (the first round)
        or those of the streams touched since the round before. Returns how many records it applied."""
        report, live = self.report, self.settings.db_schema
        async with self.snapshot.transaction(isolation="repeatable_read", readonly=True):
            applied = await self.follower.follow(await _live_offsets(self.snapshot, self.settings))
            touched = self.follower.take_touched()
            streams = touched if report.rounds else None
            live_sums = await table_checksums(self.snapshot, live, streams)
        rebuilt_sums = await table_checksums(self.owner, self.rebuilt, streams)
        if not report.rounds:
            report.checksums = {t: (live_sums[t], rebuilt_sums[t]) for t in live_sums}
        report.compare(live_sums, rebuilt_sums)
        report.rounds += 1
        return applied


async def _copy_catalogs(owner: asyncpg.Connection, rebuilt: str) -> None:
    """The catalog version the rebuilt costs name, into the live schema's catalogs (which keep every version)."""
    source = quote_schema(rebuilt)
    async with owner.transaction():
        await owner.execute(f"INSERT INTO price_catalogs SELECT * FROM {source}.price_catalogs ON CONFLICT DO NOTHING")
        await owner.execute(f"INSERT INTO model_prices SELECT * FROM {source}.model_prices ON CONFLICT DO NOTHING")


async def _switch(rounds: _Rounds, *, force: bool) -> None:
    """The exclusive section, tried until it fits in its time limit (see the module docstring, step 3)."""
    owner, follower, report, rebuilt = rounds.owner, rounds.follower, rounds.report, rounds.rebuilt
    live = rounds.settings.db_schema
    for _ in range(_SWITCH_TRIES):
        report.switch_tries += 1
        try:
            async with owner.transaction():
                await owner.execute(query("switch_lock_timeout"), f"{int(_LOCK_WAIT_S * 1000)}ms")
                await owner.execute(query("switch_lock"), live)
                locked = time.monotonic()
                # Everything under the lock, the log's fetches and the moves' locks included, within the limit:
                # past it the transaction rolls back and the workers go on.
                async with asyncio.timeout(_LOCK_HOLD_S):
                    targets = await _live_offsets(owner, rounds.settings)
                    if sum(targets.values()) - sum(follower.positions.values()) > _LOCKED_RECORDS:
                        raise _TryAgain
                    await follower.follow(targets)
                    streams = sorted(follower.touched)  # taken only once compared: a try given up keeps them
                    report.compare(await table_checksums(owner, live, streams),
                                   await table_checksums(owner, rebuilt, streams))
                    follower.touched.difference_update(streams)
                    if await _audit_size(owner, live) != await _audit_size(owner, rebuilt):
                        # Events were projected outside the log (a dead-letter replay) while the rebuild ran.
                        report.differing.add("audit_log")
                    if not (report.equal or (force and "audit_log" not in report.differing)):
                        return
                    retired = f"{live}_retired_{datetime.now(UTC):%Y%m%d%H%M%S}"
                    await owner.execute(f"CREATE SCHEMA {quote_schema(retired)}")
                    for source, target in ((live, retired), (rebuilt, live)):
                        for table in DERIVED_TABLES:
                            await owner.execute(f"ALTER TABLE {quote_schema(source)}.{table} "
                                                f"SET SCHEMA {quote_schema(target)}")
                    report.lock_held_s = time.monotonic() - locked
                report.switched, report.retired_schema = True, retired
                return
        except (_TryAgain, TimeoutError, asyncpg.LockNotAvailableError):
            log.info("the switch-over did not fit in its time limit; catching up first")
            await rounds.compare()
    raise TransientError(f"could not switch over within {_LOCK_HOLD_S} s in {_SWITCH_TRIES} tries: the live "
                         "workers kept the apply lock busy or the log grew too fast; run `runledger rebuild` again "
                         "(it resumes)")


async def _audit_size(conn: asyncpg.Connection, schema: str) -> int:
    return int(await conn.fetchval(f"SELECT count(*) FROM {quote_schema(schema)}.audit_log"))
