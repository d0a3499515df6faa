"""``runledger rebuild``: re-project the whole log into a fresh schema, then switch over to it.

1. A new schema ``<live>_rebuild_<time>`` gets the migrations and the price
   catalog; a consumer of its own (no group) reads every partition from
   offset 0 and applies batches exactly as a worker does.
2. It follows the live workers: it reads their offsets from the live schema
   and applies up to them, again and again, until the gap is small.
3. Switch-over, in one transaction: take the live schema's apply lock
   exclusively (live workers pause between batches), apply exactly up to the
   live offsets, compare a checksum per table, and if all are equal rename
   ``<live>`` to ``<live>_retired_<time>`` and the rebuilt schema to
   ``<live>``. Workers go on by schema name, from the same offsets, in the
   rebuilt tables. If a checksum differs nothing is switched (unless forced)
   and both schemas stay for inspection.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from runledger.projections.postgres.checksum import table_checksums
from runledger.projections.postgres.db import connect, connect_one, migrate
from runledger.projections.postgres.queries import query, quote_schema
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.pricing import load_tokencost_catalog
from runledger.projections.records import LogRecord
from runledger.schemas.errors import PermanentError, TransientError
from runledger.streams.settings import Settings

__all__ = ["RebuildFailed", "RebuildReport", "rebuild"]

# Follow the live workers outside the lock until one round applies fewer records than this.
_SMALL_GAP = 2000

Progress = Callable[[int, int], None]
"""Called with (records applied so far, records to apply as far as known)."""


class RebuildFailed(PermanentError):
    """The log cannot be re-projected completely (for example, retention deleted its start)."""

    code = "rebuild_failed"


@dataclass(slots=True)
class RebuildReport:
    """What a rebuild did; ``checksums``: table -> (live (rows, md5), rebuilt (rows, md5))."""

    live_schema: str
    rebuilt_schema: str
    retired_schema: str | None
    records: int
    seconds: float
    checksums: dict[str, tuple[tuple[int, str], tuple[int, str]]] = field(default_factory=dict)
    switched: bool = False

    @property
    def equal(self) -> bool:
        return all(live == rebuilt for live, rebuilt in self.checksums.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "live_schema": self.live_schema, "rebuilt_schema": self.rebuilt_schema,
            "retired_schema": self.retired_schema, "records": self.records, "seconds": round(self.seconds, 3),
            "equal": self.equal, "switched": self.switched,
            "tables": {t: {"live_rows": lv[0], "live_md5": lv[1], "rebuilt_rows": rb[0], "rebuilt_md5": rb[1],
                           "equal": lv == rb} for t, (lv, rb) in self.checksums.items()},
        }


class _Follower:
    """Reads the log partition by partition and applies it to the rebuilt schema, never past a target."""

    def __init__(self, consumer: AIOKafkaConsumer, store: ProjectionStore, topic: str,
                 progress: Progress | None) -> None:
        self._consumer, self._store, self._topic, self._progress = consumer, store, topic, progress
        self.positions: dict[int, int] = {}
        self.applied = 0

    async def start(self) -> None:
        partitions = self._consumer.partitions_for_topic(self._topic) or set()
        if not partitions:
            return
        tps = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        for tp, first in (await self._consumer.beginning_offsets(tps)).items():
            if first > 0:
                raise RebuildFailed(f"{tp.topic} partition {tp.partition} starts at offset {first}: records before "
                                    "it were deleted, so the log no longer holds the whole history")
            self._consumer.seek(tp, 0)
            self.positions[tp.partition] = 0

    async def follow(self, targets: dict[int, int]) -> int:
        """Apply every record below ``targets`` (partition -> offset). Returns how many were applied."""
        unknown = sorted(set(targets) - set(self.positions))
        if unknown and any(targets[p] > 0 for p in unknown):
            raise RebuildFailed(f"the live offsets name partitions {unknown} that {self._topic} does not have")
        before = self.applied
        self._report(targets)
        while behind := [TopicPartition(self._topic, p) for p, end in sorted(targets.items())
                         if self.positions.get(p, 0) < end]:
            fetched = await self._consumer.getmany(*behind, timeout_ms=1000, max_records=5000)
            records = []
            for tp, messages in fetched.items():
                end = targets[tp.partition]
                records += [LogRecord(m.topic, m.partition, m.offset, m.key, m.value or b"")
                            for m in messages if m.offset < end]
                if messages and messages[-1].offset >= end:
                    self._consumer.seek(tp, end)  # fetched past the target: read it again next round
            if records:
                await self._store.apply_until_done(records)
                for r in records:
                    self.positions[r.partition] = r.offset + 1
                self.applied += len(records)
                self._report(targets)
        return self.applied - before

    def _report(self, targets: dict[int, int]) -> None:
        if self._progress is not None:
            todo = sum(max(end - self.positions.get(p, 0), 0) for p, end in targets.items())
            self._progress(self.applied, self.applied + todo)


async def _live_offsets(conn: asyncpg.Connection, settings: Settings) -> dict[int, int]:
    rows = await conn.fetch(query("load_offsets"), settings.consumer_group, settings.events_topic)
    return {r["partition"]: r["next_offset"] for r in rows}


async def rebuild(settings: Settings, *, force: bool = False, switch: bool = True,
                  progress: Progress | None = None) -> RebuildReport:
    """Rebuild ``settings.db_schema`` from the log; see the module docstring.

    ``force``: switch even if a checksum differs (after a deliberate change of the
    projection rules). ``switch=False``: build and compare only.
    """
    live = settings.db_schema
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    rebuilt, retired = f"{live}_rebuild_{stamp}", f"{live}_retired_{stamp}"
    for name in (rebuilt, retired):
        quote_schema(name)  # a name too long for PostgreSQL fails here, before any work
    started = time.monotonic()
    owner = await connect_one(settings.database_url, live)
    try:
        if not await owner.fetchval("SELECT to_regclass('consumer_offsets') IS NOT NULL"):
            raise RebuildFailed(f"schema {live} has no projection tables to rebuild; run a worker or "
                                "`runledger db migrate` first")
        await migrate(settings.database_url, rebuilt)
        try:
            report = await _rebuild_into(owner, settings, rebuilt, retired, force=force, switch=switch,
                                         progress=progress)
        except BaseException:
            # A partial copy is of no use; the live tables were never touched.
            with contextlib.suppress(Exception):
                await owner.execute(f"DROP SCHEMA IF EXISTS {quote_schema(rebuilt)} CASCADE")
            raise
    finally:
        await owner.close()
    report.seconds = time.monotonic() - started
    return report


async def _rebuild_into(owner: asyncpg.Connection, settings: Settings, rebuilt: str, retired: str, *,
                        force: bool, switch: bool, progress: Progress | None) -> RebuildReport:
    live = settings.db_schema
    report = RebuildReport(live, rebuilt, None, 0, 0.0)
    pool = await connect(settings.database_url, rebuilt)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None,
                                enable_auto_commit=False, max_partition_fetch_bytes=4 * 1024 * 1024)
    try:
        catalog = load_tokencost_catalog()
        await ProjectionStore.save_catalog(pool, catalog)
        store = ProjectionStore(pool, catalog, settings.consumer_group)
        await consumer.start()
        follower = _Follower(consumer, store, settings.events_topic, progress)
        await follower.start()
        while await follower.follow(await _live_offsets(owner, settings)) >= _SMALL_GAP:
            pass
        async with owner.transaction():
            await owner.execute(query("switch_lock"), live)
            await follower.follow(await _live_offsets(owner, settings))
            live_sums = await table_checksums(owner, live)
            rebuilt_sums = await table_checksums(owner, rebuilt)
            report.checksums = {t: (live_sums[t], rebuilt_sums[t]) for t in live_sums}
            if switch and (report.equal or force):
                await owner.execute(f"ALTER SCHEMA {quote_schema(live)} RENAME TO {quote_schema(retired)}")
                await owner.execute(f"ALTER SCHEMA {quote_schema(rebuilt)} RENAME TO {quote_schema(live)}")
                report.switched, report.retired_schema = True, retired
        report.records = follower.applied
    except KafkaError as e:
        raise TransientError(f"reading {settings.events_topic}: {e}") from e
    finally:
        await consumer.stop()
        await pool.close()
    return report
