"""``runledger bench``: latency at fixed produce rates, and a worker's memory over a long run.

Latency is measured from an event's ``time`` (set to the moment it is due to be sent) to the commit of the
batch that projects it: the bench notes, at every commit (``LISTEN``), how far each partition's stored
offset has come, and an event counts as committed at the first note past its offset. One worker process
runs on a topic of its own, started and given its partitions before the first event is sent.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from runledger.projections.postgres.db import NOTIFY_CHANNEL, connect_one, migrate
from runledger.projections.postgres.queries import query
from runledger.streams.dev.benchpaths import BenchRun, Workers, committed, run_workers
from runledger.streams.dev.workload import Workload
from runledger.streams.kafka import client_options
from runledger.streams.settings import Settings
from runledger.streams.topics import ensure_topics

__all__ = ["latency", "memory"]

_BUILD_S_PER_EVENT = 150e-6  # generous: the schedule starts once every event is built


async def latency(run: BenchRun, rate: float, seconds: float) -> dict[str, Any]:
    """p50, p99 and max of event time to commit, in ms, with one worker and events sent at ``rate`` per s."""
    settings = run.fresh(f"lat{int(rate)}", prefix=f"lat{int(rate)}")
    count = max(int(rate * seconds), 1)
    await ensure_topics(settings, {settings.events_topic: settings.event_partitions})
    await migrate(settings.database_dsn(), settings.db_schema)  # as the owner: a worker's login applies none
    workers = Workers(settings, 1)
    conn = await connect_one(settings.database_dsn(), settings.db_schema)
    marks: list[tuple[float, dict[int, int]]] = []
    woken = asyncio.Event()
    await conn.add_listener(NOTIFY_CHANNEL, lambda *args: woken.set() if args[3] == settings.db_schema else None)
    try:
        await _wait_assigned(conn, settings, workers)
        start = datetime.now(UTC) + timedelta(seconds=1 + count * _BUILD_S_PER_EVENT)
        workload = Workload(count, run_tag=settings.topic_prefix, seed=int(rate), start=start, rate=rate)
        watcher = asyncio.create_task(_watch(conn, settings, woken, marks))
        try:
            positions = await _send_on_schedule(settings, workload, start.timestamp(), rate)
            await _until_committed(marks, positions, workers, timeout=120 + seconds)
        finally:
            watcher.cancel()
    finally:
        await workers.stop()
        await conn.close()
    delays = sorted(_delays(marks, positions, start.timestamp(), rate))
    return {"rate": rate, "events": len(delays), "seconds": seconds,
            "p50_ms": round(statistics.median(delays) * 1000, 1),
            "p99_ms": round(delays[min(len(delays) - 1, int(len(delays) * 0.99))] * 1000, 1),
            "max_ms": round(delays[-1] * 1000, 1)}


async def memory(run: BenchRun, events: int) -> dict[str, Any]:
    """One worker's RSS while it projects ``events`` events: from when 5 % are committed to the end."""
    settings = run.fresh("long", prefix="long")
    run.progress(f"long run: building and publishing {events:,} events ...")
    workload = Workload(events, run_tag=settings.topic_prefix, seed=3)
    await run.publish(settings, workload)
    total = len(workload)
    del workload  # gigabytes for a million events: collecting over them would take the worker's CPU
    gc.collect()
    run.progress(f"long run: one worker projects {total:,} events ...")
    rate, samples, _ = await run_workers(settings, total, 1, rss_every=2.0)
    settled = [s for s in samples if s[0] >= total * 0.05] or samples
    return {"events": total, "events_per_s": round(rate), "start_mib": round(settled[0][1], 1),
            "max_mib": round(max(s[1] for s in settled), 1), "end_mib": round(settled[-1][1], 1),
            "growth_mib": round(settled[-1][1] - settled[0][1], 1),
            "samples": [(n, round(mib, 1)) for n, mib in samples]}


async def _wait_assigned(conn: asyncpg.Connection, settings: Settings, workers: Workers) -> None:
    """Until the worker reports all partitions as its own (its heartbeat), then a moment to seek and resume."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        workers.check("while starting")
        try:
            rows = await conn.fetch(query("live_workers"), settings.consumer_group, 10)
        except asyncpg.UndefinedTableError:
            rows = []
        if rows and sum(len(r["partitions"] or []) for r in rows) >= settings.event_partitions:
            await asyncio.sleep(2)
            return
        await asyncio.sleep(0.2)
    raise workers.stuck("the worker did not take its partitions within 120 s")


async def _watch(conn: asyncpg.Connection, settings: Settings, woken: asyncio.Event,
                 marks: list[tuple[float, dict[int, int]]]) -> None:
    while True:
        await woken.wait()
        woken.clear()
        marks.append((time.time(), await committed(conn, settings)))


async def _send_on_schedule(settings: Settings, workload: Workload, start: float, rate: float) -> list[tuple[int, int]]:
    """Send event ``i`` at ``start + i / rate`` (in bursts every 5 ms); the (partition, offset) of each."""
    producer = AIOKafkaProducer(**client_options(settings), acks="all",
                                enable_idempotence=False, linger_ms=1)
    await producer.start()
    try:
        await asyncio.sleep(max(0.0, start - time.time()))
        futures, sent = [], 0
        while sent < len(workload):
            due = min(len(workload), int((time.time() - start) * rate) + 1)
            for key, value in workload.records[sent:due]:
                futures.append(await producer.send(settings.events_topic, value, key=key))
            sent = due
            await asyncio.sleep(0.005)
        return [(m.partition, m.offset) for m in await asyncio.gather(*futures)]
    finally:
        await producer.stop()


async def _until_committed(marks: list[tuple[float, dict[int, int]]], positions: list[tuple[int, int]],
                           workers: Workers, timeout: float) -> None:
    last: dict[int, int] = {}
    for partition, offset in positions:
        last[partition] = max(last.get(partition, -1), offset)
    deadline = time.monotonic() + timeout
    while not marks or any(marks[-1][1].get(p, 0) <= o for p, o in last.items()):
        workers.check("during the latency run")
        if time.monotonic() > deadline:
            raise workers.stuck(f"not every event was committed {timeout:.0f} s after the last was sent")
        await asyncio.sleep(0.05)


def _delays(marks: list[tuple[float, dict[int, int]]], positions: list[tuple[int, int]], start: float,
            rate: float) -> list[float]:
    """Seconds from each event's time to the first commit note past its offset."""
    times = [t for t, _ in marks]
    stored = {p: [m.get(p, 0) for _, m in marks] for p in {p for p, _ in positions}}
    # Stored offsets only grow from note to note: the first note past an offset is found by bisection.
    return [times[bisect.bisect_right(stored[p], o)] - (start + i / rate) for i, (p, o) in enumerate(positions)]
