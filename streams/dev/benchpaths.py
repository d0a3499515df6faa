"""``runledger bench``: the paths measured for throughput, and running worker processes under measurement.

Every path reads the same interleaved workload (``workload.py``: hundreds of executions under way at
once, every event type), several rounds each, and each round has a schema and consumer group of its
own. The paths:

- ``floor``: aiokafka ``getmany`` and ``COPY`` of the raw records into one table, a transaction per
  batch: what moving the bytes from Kafka into PostgreSQL costs at least.
- ``store``: the same loop through ``ProjectionStore.apply_batch`` (decode, checks, hash, rules, writes),
  in this process: runledger's work without Faust.
- ``workers_1``, ``workers_2``: real ``runledger worker`` processes of one consumer group. Their rate runs
  from the first batch committed to the last (offsets as stored with the projection), so that start-up
  does not count; rebalancing between two workers does. Over the same span, the share of their
  transactions' time spent waiting for locks (``benchlocks.py``), sampled from ``pg_stat_activity``.

Latency and memory (``benchlatency.py``) run workers the same way. Every schema is dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import asyncpg
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from runledger.projections.postgres.db import connect, connect_one, migrate
from runledger.projections.postgres.queries import query, quote_schema
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.pricing import load_tokencost_catalog
from runledger.projections.records import LogRecord
from runledger.schemas.errors import TransientError
from runledger.streams.dev import WORKER_COMMAND
from runledger.streams.dev.benchlocks import LockSampler, combine, worker_application_name, worker_database_url
from runledger.streams.dev.workload import Workload
from runledger.streams.kafka import client_options
from runledger.streams.settings import Settings
from runledger.streams.topics import ensure_topics

__all__ = ["BenchRun", "Progress", "WorkerRun", "Workers", "committed", "machine", "run_workers", "spread"]

Progress = Callable[[str], None]


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min and max of one path's rounds, and the rounds themselves."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "rounds": [round(v, 3) for v in values]}


def _lock_spread(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """A worker path's lock-wait share over its rounds (``spread``; None each if no round had a transaction to
    sample), with the totals and the statement waited in most (``benchlocks.combine``)."""
    together = combine(rounds)
    shares = together.pop("shares")
    figures = spread(shares) if shares else {"median": None, "min": None, "max": None, "rounds": []}
    return {**figures, **together}


class BenchRun:
    """One benchmark: its own topic prefix and schemas (all dropped by ``close``)."""

    def __init__(self, settings: Settings, progress: Progress) -> None:
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime()) + uuid.uuid4().hex[:6]
        self.stamp, self.progress = stamp, progress
        self.settings = settings.model_copy(update={"topic_prefix": f"bench{stamp}"})
        self.schemas: list[str] = []

    def fresh(self, name: str, prefix: str | None = None) -> Settings:
        """Settings with a schema and consumer group of their own (and a topic prefix, if given)."""
        schema = f"bench_{self.stamp}_{name}"
        self.schemas.append(schema)
        update = {"db_schema": schema, "consumer_group": f"bench-{self.stamp}-{name}"}
        if prefix is not None:
            update["topic_prefix"] = f"bench{self.stamp}{prefix}"
        return self.settings.model_copy(update=update)

    async def close(self) -> None:
        admin = await asyncpg.connect(self.settings.database_dsn())  # the owner of the bench's schemas
        try:
            for schema in self.schemas:
                await admin.execute(f"DROP SCHEMA IF EXISTS {quote_schema(schema)} CASCADE")
        finally:
            await admin.close()

    async def publish(self, settings: Settings, workload: Workload) -> list[tuple[int, int]]:
        """Send every record and wait for the acknowledgements; the (partition, offset) of each."""
        await ensure_topics(settings, {settings.events_topic: settings.event_partitions})
        producer = AIOKafkaProducer(**client_options(settings), acks="all",
                                    enable_idempotence=False, linger_ms=5, max_batch_size=256 * 1024)
        await producer.start()
        try:
            positions = []
            for start in range(0, len(workload), 10_000):
                futures = [await producer.send(settings.events_topic, value, key=key)
                           for key, value in workload.records[start:start + 10_000]]
                positions += [(m.partition, m.offset) for m in await asyncio.gather(*futures)]
            return positions
        finally:
            await producer.stop()

    async def throughput(self, workload: Workload, rounds: int, worker_counts: tuple[int, ...], *,
                         lock_every: float = 0.1) -> dict[str, Any]:
        """Events per second of every path, ``rounds`` times each, each worker path's share of the floor, and its
        lock waits (sampled every ``lock_every`` seconds)."""
        total = len(workload)
        self.progress(f"publishing {total:,} events of {workload.streams:,} executions, interleaved ...")
        await self.publish(self.settings, workload)
        names = ["floor", "store", *(f"workers_{n}" for n in worker_counts)]
        paths: dict[str, list[float]] = {name: [] for name in names}
        locks: dict[str, list[dict[str, Any]]] = {f"workers_{n}": [] for n in worker_counts}
        for r in range(1, rounds + 1):
            self.progress(f"round {r} of {rounds}: floor, store" + "".join(f", {n} worker(s)" for n in worker_counts))
            paths["floor"].append(total / await self._floor(self.fresh(f"floor{r}"), total))
            paths["store"].append(total / await self._store(self.fresh(f"store{r}"), total))
            for n in worker_counts:
                done = await run_workers(self.fresh(f"w{n}r{r}"), total, n, lock_every=lock_every)
                paths[f"workers_{n}"].append(done.rate)
                if done.locks is not None:
                    locks[f"workers_{n}"].append(done.locks)
        report: dict[str, Any] = {"events": total, "executions": workload.streams, "rounds": rounds,
                                  "events_per_s": {name: spread(v) for name, v in paths.items()}}
        report["share_of_floor"] = {
            name: spread([w / f for w, f in zip(v, paths["floor"], strict=True)])
            for name, v in paths.items() if name != "floor"}
        report["lock_wait"] = {name: _lock_spread(rounds) for name, rounds in locks.items()}
        return report

    async def _floor(self, settings: Settings, total: int) -> float:
        conn = await connect_one(settings.database_dsn(), settings.db_schema)
        try:
            await conn.execute(f"CREATE SCHEMA {quote_schema(settings.db_schema)}")  # a fixed, validated name
            await conn.execute(query("bench_create_raw"))

            async def copy(batch: list[LogRecord]) -> None:
                async with conn.transaction():
                    await conn.copy_records_to_table("bench_raw", records=[
                        (r.topic, r.partition, r.offset, r.key, r.value) for r in batch])

            return await _consume_all(settings, total, copy)
        finally:
            await conn.close()

    async def _store(self, settings: Settings, total: int) -> float:
        await migrate(settings.database_dsn(), settings.db_schema)
        pool = await connect(settings.database_dsn("worker"), settings.db_schema)
        try:
            store = ProjectionStore(pool, load_tokencost_catalog(), settings.consumer_group)

            async def project(batch: list[LogRecord]) -> None:
                await store.apply_batch(batch)

            return await _consume_all(settings, total, project)
        finally:
            await pool.close()


async def _consume_all(settings: Settings, total: int, handle: Callable[[list[LogRecord]], Awaitable[None]]) -> float:
    """Seconds to read ``total`` records from the start of the log and hand them over batch by batch."""
    consumer = AIOKafkaConsumer(**client_options(settings), group_id=None,
                                enable_auto_commit=False, max_partition_fetch_bytes=4 * 1024 * 1024)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(settings.events_topic, p) for p in range(settings.event_partitions)])
        await consumer.seek_to_beginning()
        started, done = time.monotonic(), 0
        while done < total:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=5000)
            batch = [LogRecord(m.topic, m.partition, m.offset, m.key, m.value or b"")
                     for messages in fetched.values() for m in messages]
            if batch:
                await handle(batch)
                done += len(batch)
        return time.monotonic() - started
    finally:
        await consumer.stop()


async def committed(conn: asyncpg.Connection, settings: Settings) -> dict[int, int]:
    """partition -> next offset, as the workers stored it with the projection (nothing before the schema
    exists). ``conn`` is on the settings' schema (``connect_one``)."""
    try:
        rows = await conn.fetch(query("load_offsets"), settings.consumer_group, settings.events_topic)
    except asyncpg.UndefinedTableError:
        return {}
    return {r["partition"]: r["next_offset"] for r in rows}


class Workers:
    """Worker processes under measurement, each logging (level info) to a file of the bench's own."""

    def __init__(self, settings: Settings, processes: int) -> None:
        # Their connections carry an application_name of this schema's, which the lock sampler looks for.
        env = {**os.environ, "RUNLEDGER_DATABASE_URL": worker_database_url(settings),
               "RUNLEDGER_TOPIC_PREFIX": settings.topic_prefix,
               "RUNLEDGER_DB_SCHEMA": settings.db_schema, "RUNLEDGER_CONSUMER_GROUP": settings.consumer_group}
        directory = settings.state_dir / "bench"
        directory.mkdir(parents=True, exist_ok=True)
        self.logs = [directory / f"{settings.db_schema}-{n}.log" for n in range(processes)]
        self.processes = []
        for path in self.logs:
            with path.open("wb") as out:  # the child keeps its own copy of the descriptor
                self.processes.append(subprocess.Popen([*WORKER_COMMAND, "--loglevel", "info"], env=env,
                                                       stdin=subprocess.DEVNULL, stdout=out, stderr=out))

    def check(self, doing: str) -> None:
        """Raise if a worker exited, with the end of its log."""
        for process, path in zip(self.processes, self.logs, strict=True):
            if process.poll() is not None:
                raise TransientError(f"a worker exited {doing} (exit {process.returncode}); the end of {path}:\n"
                                     f"{path.read_text(errors='replace')[-3000:]}")

    def stuck(self, why: str) -> TransientError:
        return TransientError(f"{why}; worker logs: {', '.join(map(str, self.logs))}")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    async def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                await asyncio.to_thread(process.wait, timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)


class WorkerRun(NamedTuple):
    """What ``run_workers`` measured."""

    rate: float  # events per second (``_span``)
    rss: list[tuple[int, float]]  # (committed, RSS in MiB) samples, if asked for
    locks: dict[str, Any] | None  # the lock waits over the same span (``benchlocks.summarize``), if asked for


async def run_workers(settings: Settings, total: int, processes: int, *, stall_s: float = 120,
                      rss_every: float | None = None, lock_every: float | None = None) -> WorkerRun:
    """Run ``processes`` workers over the first ``total`` records of the log: their events per second, every
    ``rss_every`` seconds (committed, their RSS in MiB), and with ``lock_every`` their lock waits over the
    span the rate covers. Raises if nothing is committed for ``stall_s`` seconds."""
    await migrate(settings.database_dsn(), settings.db_schema)  # as the owner: a worker's login applies none
    workers = Workers(settings, processes)
    # As the superuser: only it sees what the workers' backends (another role's) wait for.
    sampler = (LockSampler(settings.database_dsn("admin"), worker_application_name(settings), every=lock_every)
               if lock_every is not None else None)
    marks: list[tuple[float, int]] = [(time.monotonic(), 0)]
    samples: list[tuple[int, float]] = []
    try:
        if sampler is not None:
            sampler.start()
        conn = await connect_one(settings.database_dsn(), settings.db_schema)
        try:
            next_rss = 0.0
            while marks[-1][1] < total:
                workers.check(f"after {marks[-1][1]:,} of {total:,} events")
                now, done = time.monotonic(), sum((await committed(conn, settings)).values())
                if done == marks[-1][1] and now - next((t for t, d in marks if d == done), now) > stall_s:
                    raise workers.stuck(f"the workers committed nothing for {stall_s:.0f} s, at {done:,} of {total:,}")
                marks.append((now, done))
                if rss_every is not None and now >= next_rss:
                    samples.append((done, sum(psutil.Process(pid).memory_info().rss for pid in workers.pids) / 2**20))
                    next_rss = now + rss_every
                await asyncio.sleep(0.05)
        finally:
            await conn.close()
    finally:
        if sampler is not None:
            await sampler.stop()
        await workers.stop()
    (start, first), (end, last) = _span(marks, total)
    return WorkerRun((last - first) / (end - start), samples,
                     sampler.summary(start, end) if sampler is not None else None)


def _span(marks: list[tuple[float, int]], total: int) -> tuple[tuple[float, int], tuple[float, int]]:
    """The (time, committed) marks a rate runs between: from the first commit to the last, so that start-up
    (until the first batch is committed) does not count, rebalancing and every later batch do. If the first
    batch held over a fifth of the events (a run too short to measure), from the start instead: start-up
    included, as the least bad."""
    first = next(m for m in marks if m[1] > 0)  # marks[0] is the start, with nothing committed
    last = next(m for m in marks if m[1] >= total)
    if first[1] <= total * 0.2 and last[0] > first[0]:
        return first, last
    return marks[0], (last[0], total)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}"}
