"""A real worker process against poison records, signals during retry waits, and pauses past its session
timeout: it never exits, loses nothing and duplicates nothing."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from runledger.projections.postgres.db import migrate
from runledger.projections.postgres.wait import stream_partition
from runledger.streams.dev.fleet import simulate_fleet
from runledger.streams.producer.client import EventProducer
from runledger.streams.worker.retry import RetrySchedule, header_values
from tests.integration.conftest import (
    FIRST_STREAM,
    poll,
    rechain,
    rehashed,
    running_worker,
    settings_of,
    worker_log,
)
from tests.integration.projections.test_isolation import REFUSE_POISON, stream

DEADLINE_S = 150
PARTITIONS = 4  # RUNLEDGER_EVENT_PARTITIONS of the test stack


@pytest.fixture
async def worker_env(env: dict[str, str]) -> AsyncIterator[tuple[dict[str, str], asyncpg.Connection]]:
    """A schema and group of the test's own, migrated, and an owner connection on it."""
    schema = f"w_{uuid.uuid4().hex[:12]}"
    env = {**env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}"}
    settings = settings_of(env)
    await migrate(settings.database_url, schema)
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": schema})
    try:
        yield env, conn
    finally:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


def _key_on(partition: int, prefix: str) -> str:
    """A stream id that lands on ``partition``."""
    n = 0
    while stream_partition(f"{prefix}-{n}", PARTITIONS) != partition:
        n += 1
    return f"{prefix}-{n}"


def _round(tag: str) -> tuple[list[tuple[bytes, bytes]], dict[bytes, str], int]:
    """Poison of every kind on every partition, between valid streams: (key, value) to send in order, the
    reason each poison record must be dead-lettered with, and how many events must be projected."""
    sends: list[tuple[bytes, bytes]] = []
    poison: dict[bytes, str] = {}
    projected = 0
    for p in range(PARTITIONS):
        nul_id = _key_on(p, f"nul-{tag}")
        nul = rehashed(rechain(nul_id)[0], data={"workflow": "w", "input": {"note": "zero\u0000byte"}})
        big_id = _key_on(p, f"big-{tag}")
        big = rechain(big_id)[0]
        big_right = rehashed(big, data={**big["data"], "input": {"blob": "r" * (2 * 1024 * 1024)}})
        big_wrong = {**big_right, "hash": "0" * 64, "id": str(uuid.uuid4())}
        refused = stream(_key_on(p, f"refused-{tag}"), poison_at=2)
        wide = [dict(e) for e in FIRST_STREAM]
        wide[1] = {**wide[1], "data": {**wide[1]["data"], "order": 2**31}}
        wide = rechain(_key_on(p, f"wide-{tag}"), wide)
        good = rechain(_key_on(p, f"good-{tag}"))
        for value, reason in [(orjson.dumps(nul), "invalid_event"), (orjson.dumps(big_right), "too_large"),
                              (orjson.dumps(big_wrong), "too_large"), (orjson.dumps(refused[2]),
                                                                       "rejected_by_database")]:
            poison[value] = reason
        projected += len(wide) + len(good) + 2  # refused: seq 1 and 2; 4..9 park behind its letter
        streams = [[nul], [big_right], [big_wrong], refused, wide, good]
        for i in range(max(map(len, streams))):
            sends += [(e["subject"].encode(), orjson.dumps(e)) for s in streams if i < len(s) for e in [s[i]]]
    return sends, poison, projected


async def _settled(conn: asyncpg.Connection, letters: int, projected: int) -> list[Any] | None:
    rows = await conn.fetch("SELECT reason, value, stream_id FROM dead_letters WHERE status = 'dead'")
    count = await conn.fetchval("SELECT count(*) FROM audit_log")
    return rows if len(rows) >= letters and count >= projected else None


@pytest.mark.slow
async def test_poison_on_every_partition_stops_no_worker_and_a_successor_after_kill_9_does_the_same(
        worker_env: tuple[dict[str, str], asyncpg.Connection]) -> None:
    env, conn = worker_env
    settings = settings_of(env)
    await conn.execute(REFUSE_POISON)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_idempotence=False,
                                max_request_size=8 * 1024 * 1024)
    await producer.start()
    first, poison_1, projected_1 = _round("one")
    second, poison_2, projected_2 = _round("two")
    try:
        async with running_worker(env) as worker:
            for key, value in first:
                await producer.send_and_wait(settings.events_topic, value, key=key)
            letters = await poll(lambda: _settled(conn, len(poison_1), projected_1), DEADLINE_S,
                                 "round one projected or dead-lettered")
            assert {bytes(r["value"]): r["reason"] for r in letters} == poison_1
            assert worker.poll() is None, "the worker must never exit on data"
            # Round two: the worker is killed while it works on it; a successor takes over.
            for key, value in second[:len(second) // 2]:
                await producer.send_and_wait(settings.events_topic, value, key=key)
            worker.kill()
        async with running_worker(env) as successor:
            for key, value in second[len(second) // 2:]:
                await producer.send_and_wait(settings.events_topic, value, key=key)
            letters = await poll(lambda: _settled(conn, len(poison_1) + len(poison_2), projected_1 + projected_2),
                                 DEADLINE_S, "round two projected or dead-lettered")
            assert successor.poll() is None
    finally:
        await producer.stop()
    assert {bytes(r["value"]): r["reason"] for r in letters} == {**poison_1, **poison_2}  # each once
    rows = await conn.fetch("SELECT stream_id, seq FROM audit_log")
    assert len(rows) == len(set(rows)) == projected_1 + projected_2  # nothing twice, nothing lost
    assert await conn.fetchval("SELECT count(*) FROM steps WHERE step_order = $1", 2**31) == 2 * PARTITIONS
    parked = await conn.fetchval("SELECT count(*) FROM parked_events")
    assert parked == 2 * PARTITIONS * 6


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_during_each_retry_wait_loses_nothing(
        worker_env: tuple[dict[str, str], asyncpg.Connection], signum: signal.Signals) -> None:
    """A record waits in each retry topic (1 s to 16 s) when the worker is stopped: after a restart every one
    is projected. (Had the stop acknowledged them, they would be gone: nothing else holds them.)"""
    env, conn = worker_env
    settings = settings_of(env)
    schedule = RetrySchedule(settings.topic_prefix, settings.retry_delays)
    chains = {delay: rechain(f"waits-{delay:g}s-{uuid.uuid4().hex[:6]}") for delay in settings.retry_delays}
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_idempotence=False)
    await producer.start()

    async def projected(seq: int) -> int:
        return int(await conn.fetchval("SELECT count(*) FROM audit_log WHERE seq = $1", seq))

    try:
        async with running_worker(env, loglevel="info") as worker:
            for events in chains.values():
                await producer.send_and_wait(settings.events_topic, orjson.dumps(events[0]),
                                             key=events[0]["subject"].encode())
            await poll(lambda: _equals(lambda: projected(1), len(chains)), DEADLINE_S, "every seq 1 projected")
            now = datetime.now(UTC)
            for attempts, (delay, events) in enumerate(chains.items(), start=1):
                subject = events[1]["subject"]
                headers = header_values(
                    reason="predecessor_missing", error="seq 1 is not projected yet", attempts=attempts,
                    first_failure=now, last_failure=now, topic=settings.events_topic,
                    partition=stream_partition(subject, PARTITIONS), offset=10_000 + attempts, stream=subject,
                    seq=2, event_id=events[1]["id"], event_type=events[1]["type"],
                    due=now + timedelta(seconds=delay))
                await producer.send_and_wait(schedule.topic(delay), orjson.dumps(events[1]), key=subject.encode(),
                                             headers=[(k, v.encode()) for k, v in headers.items()])

            async def all_waiting() -> bool:
                text = worker_log(worker)
                return all(f"{schedule.topic(d)}: 1 records, due in" in text for d in settings.retry_delays)

            await poll(all_waiting, DEADLINE_S, "every retry topic's record to be waited for")
            worker.send_signal(signum)
            code = await asyncio.wait_for(asyncio.to_thread(worker.wait), 60)
            assert "Traceback" not in worker_log(worker), worker_log(worker)[-5000:]
        assert code in (0, -signum, 128 + signum)
        assert await projected(2) < len(chains)  # stopped while records still waited (16 s for the last)
        async with running_worker(env):
            await poll(lambda: _equals(lambda: projected(2), len(chains)), DEADLINE_S,
                       "every waiting record projected after the restart")
    finally:
        await producer.stop()
    assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == 2 * len(chains)


@pytest.mark.slow
async def test_paused_past_the_session_timeout_five_times_it_carries_on_exactly_once(
        worker_env: tuple[dict[str, str], asyncpg.Connection]) -> None:
    env, conn = worker_env
    settings = settings_of(env)
    fleet = simulate_fleet(150, seed=11, run_tag=f"pause-{uuid.uuid4().hex[:6]}")
    total = sum(len(run.events) for run in fleet)

    async def count() -> int:
        return int(await conn.fetchval("SELECT count(*) FROM audit_log"))

    async with running_worker(env) as worker, EventProducer(settings) as producer:
        for n in range(5):
            before = await count()
            appending = asyncio.create_task(_append(producer, fleet[n::5]))
            await poll(lambda b=before: _more(count, b), DEADLINE_S, f"projection before pause {n + 1}")
            worker.send_signal(signal.SIGSTOP)  # mid-batch, as likely as not
            await asyncio.sleep(8)  # the pause itself: past the 6 s session timeout
            worker.send_signal(signal.SIGCONT)
            await appending
        await poll(lambda: _equals(count, total), DEADLINE_S, f"all {total} events projected")
        assert worker.poll() is None
        log = worker_log(worker)
    rows = await conn.fetch("SELECT stream_id, seq FROM audit_log")
    assert len(set(rows)) == len(rows) == total
    assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0
    assert "Traceback" not in log, log[-5000:]


async def _append(producer: EventProducer, runs: list[Any]) -> None:
    for run in runs:
        await producer.append_batch(run.stream_id, run.events)


async def _more(count: Any, before: int) -> bool:
    return await count() > before


async def _equals(count: Any, total: int) -> bool:
    return await count() == total
