"""The main job end to end, and ``runledger rebuild`` after it and under a live worker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from runledger.projections.postgres.checksum import table_checksums
from runledger.projections.postgres.db import connect, migrate
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.pricing import load_tokencost_catalog
from runledger.projections.records import LogRecord
from runledger.streams.dev.fleet import simulate_fleet
from runledger.streams.producer.client import append_many
from runledger.streams.settings import Settings
from runledger.streams.tools.rebuild import rebuild
from tests.conftest import CLI


@pytest.fixture
async def live(env: dict[str, str], settings: Settings) -> AsyncIterator[tuple[dict[str, str], Settings]]:
    """Settings with a schema and consumer group of this test's own; every schema made from it is dropped."""
    schema = f"l_{uuid.uuid4().hex[:10]}"
    env = {**env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}"}
    yield env, settings.model_copy(update={"db_schema": schema, "consumer_group": f"g-{schema}"})
    conn = await asyncpg.connect(settings.database_url)
    try:
        for (name,) in await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", f"{schema}%"):
            await conn.execute(f'DROP SCHEMA "{name}" CASCADE')
    finally:
        await conn.close()


def runledger(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


async def test_demo_then_rebuild_gives_equal_tables(live: tuple[dict[str, str], Settings]) -> None:
    env, settings = live
    demo = await asyncio.to_thread(runledger, env, "demo", "--executions", "40", "--seed", "3")
    assert demo.returncode == 0, demo.stderr
    for heading in ("executions by status", "spend by model", "spend by workflow", "most expensive executions"):
        assert heading in demo.stdout
    assert "chains checked intact: 40 of 40" in demo.stdout
    assert "acme/acme-internal-llm-v2" in demo.stdout and "unpriced" in demo.stdout

    done = await asyncio.to_thread(runledger, env, "rebuild", "--json")
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["switched"] and report["equal"]
    assert report["tables"]["executions"]["rebuilt_rows"] == 40
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert await table_checksums(conn, settings.db_schema) == await table_checksums(
            conn, report["retired_schema"])
    finally:
        await conn.close()


async def _live_worker(settings: Settings, stop: asyncio.Event) -> None:
    """The worker's path without Faust: read every partition, apply batches, offsets in PostgreSQL."""
    pool = await connect(settings.database_url, settings.db_schema)
    store = ProjectionStore(pool, load_tokencost_catalog(), settings.consumer_group)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(settings.events_topic, p) for p in range(settings.event_partitions)])
        await consumer.seek_to_beginning()
        while not stop.is_set():
            fetched = await consumer.getmany(timeout_ms=100, max_records=300)
            batch = [LogRecord(m.topic, m.partition, m.offset, m.key, m.value or b"")
                     for ms in fetched.values() for m in ms]
            if batch:
                await store.apply_until_done(batch)
    finally:
        await consumer.stop()
        await pool.close()


async def test_rebuild_switches_under_a_live_worker_and_nothing_is_lost(
        live: tuple[dict[str, str], Settings]) -> None:
    _, settings = live
    await migrate(settings.database_url, settings.db_schema)
    before = simulate_fleet(60, seed=4, run_tag=f"{settings.db_schema}-a")
    during = simulate_fleet(60, seed=5, run_tag=f"{settings.db_schema}-b")
    total = sum(len(r.events) for r in before + during)
    await append_many(settings, [(r.stream_id, e) for r in before for e in r.events], progress=False)
    stop = asyncio.Event()
    worker = asyncio.create_task(_live_worker(settings, stop))

    async def trickle() -> None:  # appends go on while the rebuild runs and switches
        for run in during:
            await append_many(settings, [(run.stream_id, e) for e in run.events], progress=False)
            await asyncio.sleep(0.05)  # pacing, so that appends straddle the switch

    appending = asyncio.create_task(trickle())
    report = await rebuild(settings)
    assert report.switched and report.equal, report.as_dict()
    await appending
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": settings.db_schema})
    try:
        deadline = time.monotonic() + 60
        while (projected := await conn.fetchval("SELECT count(*) FROM audit_log")) < total:
            assert time.monotonic() < deadline, f"{projected} of {total} projected"
            await asyncio.sleep(0.2)
        stop.set()
        await worker
        assert await conn.fetchval("SELECT count(*) FROM executions") == 120
        assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0
        retired = await conn.fetchval(f'SELECT count(*) FROM "{report.retired_schema}".audit_log')
        assert retired < total  # so events were projected after the switch, into the rebuilt tables
        # After the switch the live tables still equal a fresh projection of the whole log.
        again = await rebuild(settings, switch=False)
        assert again.equal and again.checksums["audit_log"][0][0] == total
    finally:
        stop.set()
        await conn.close()
