"""``runledger worker`` end to end: the real broker, a Faust worker process, real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from runledger.projections.postgres.checksum import table_checksums
from runledger.projections.postgres.db import migrate
from runledger.projections.postgres.wait import stream_partition
from runledger.schemas.checkpoint import Signer
from runledger.streams.dev.fleet import simulate_fleet
from runledger.streams.producer.client import EventProducer
from runledger.streams.settings import Settings
from tests.conftest import CLI
from tests.integration.conftest import poll, read_log, running_worker, settings_of

DEADLINE_S = 120


async def test_worker_projects_everything_appended_and_survives_bad_records(env: dict[str, str],
                                                                           tmp_path: Path) -> None:
    schema = f"w_{uuid.uuid4().hex[:12]}"
    key = tmp_path / "checkpoint.key"
    key.write_text(Signer.generate("runledger.local/log").private_key)
    key.chmod(0o600)  # a signer key others may read is refused
    env = {**env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}",
           "RUNLEDGER_CHECKPOINT_KEY": str(key), "RUNLEDGER_CHECKPOINT_INTERVAL_S": "1"}
    settings = Settings(**{k.removeprefix("RUNLEDGER_").lower(): v for k, v in env.items()})
    fleet = simulate_fleet(40, seed=2, run_tag=schema)
    async with EventProducer(settings) as producer:
        for run in fleet:
            await producer.append_batch(run.stream_id, run.events)
        await producer._kafka.send_and_wait(settings.events_topic, b"not json", key=b"junk")  # noqa: SLF001
    total = sum(len(run.events) for run in fleet)
    await migrate(settings.database_url, schema)  # the owner's work: a worker's login applies no migration
    worker = subprocess.Popen([*CLI, "worker"], env={**os.environ, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    conn = await asyncpg.connect(settings.database_url)
    try:
        deadline, projected = time.monotonic() + DEADLINE_S, 0
        while time.monotonic() < deadline and worker.poll() is None:
            try:
                projected = await conn.fetchval(f'SELECT count(*) FROM "{schema}".audit_log')
                rejected = await conn.fetchval(f'SELECT count(*) FROM "{schema}".dead_letters')
                if projected == total and rejected == 1:
                    break
            except asyncpg.UndefinedTableError:
                pass
            await asyncio.sleep(0.5)
        assert worker.poll() is None, worker.stderr.read().decode() if worker.stderr else ""
        assert projected == total
        statuses = dict(await conn.fetch(f'SELECT status, count(*) FROM "{schema}".executions GROUP BY 1'))
        expected: dict[str, int] = {}
        for run in fleet:
            status = "timeout" if run.outcome == "timed_out" else run.outcome
            expected[status] = expected.get(status, 0) + 1
        assert statuses == expected
        reason, value = await conn.fetchrow(f'SELECT reason, value FROM "{schema}".dead_letters')
        assert (reason, bytes(value)) == ("invalid_json", b"not json")
        assert (await table_checksums(conn, schema))["executions"][0] == 40
        # Its checkpoint timer signs each partition's tree, derived from Kafka, once it stops growing: every
        # record is a leaf, the one that is no event too.
        records = total + 1
        deadline, size = time.monotonic() + 30, None
        while time.monotonic() < deadline and size != records:
            size = await conn.fetchval(f'SELECT sum(s) FROM (SELECT max(size) AS s FROM "{schema}".checkpoints '
                                       'WHERE kafka_partition IS NOT NULL GROUP BY origin) c')
            await asyncio.sleep(0.5)
        assert size == records

        async def published() -> bool:  # published to Kafka before it is kept in PostgreSQL
            notes = await read_log(settings, settings.checkpoints_topic)
            newest: dict[str, int] = {}
            for r in notes:
                origin, size = r.value.decode().split("\n")[:2]
                newest[origin] = max(newest.get(origin, 0), int(size))
            return sum(newest.values()) == records

        await poll(published, 30, f"checkpoints of {records} records on {settings.checkpoints_topic}")
    finally:
        worker.terminate()
        await asyncio.to_thread(worker.communicate, timeout=30)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


@pytest.mark.slow
async def test_a_worker_starts_without_a_faust_group_even_after_others_left(env: dict[str, str]) -> None:
    """Faust's own consumer group would hold every task back until it settles, which the embedded broker
    sometimes never lets happen after members leave: the worker reads Kafka only with consumers of its own."""
    from aiokafka.admin import AIOKafkaAdminClient

    from tests.integration.conftest import poll, running_worker

    settings = Settings(**{k.removeprefix("RUNLEDGER_").lower(): v for k, v in env.items()})
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        for n in range(3):  # workers of one app, each stopped (it leaves its groups) before the next starts
            group = f"g-{uuid.uuid4().hex[:8]}"
            async with running_worker({**env, "RUNLEDGER_CONSUMER_GROUP": group}, loglevel="info") as worker:
                from tests.integration.conftest import worker_log

                async def assigned(w: subprocess.Popen[bytes] = worker) -> bool:
                    return "assigned partitions" in worker_log(w)

                await poll(assigned, 60, f"worker {n + 1} to be assigned the log's partitions")
                # Faust's consumer would have created its group's leader topic on start.
                topics = set(await admin.list_topics())
                assert settings.events_topic in topics
                assert not [t for t in topics if t.startswith(f"{settings.topic_prefix}-worker")], topics
    finally:
        await admin.close()


async def test_a_partition_held_back_does_not_slow_the_others(env: dict[str, str]) -> None:
    """A partition whose log ends before its stored offset (the log topic emptied since) is held back; checking it
    waits 5 s for the record before that offset, which is not there. It is checked again beside the consumer, not
    in its loop: events on the other partitions, appended one after another, are each projected at once."""
    schema = f"h_{uuid.uuid4().hex[:12]}"
    env = {**env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}",
           "RUNLEDGER_CHECKPOINT_INTERVAL_S": "0"}
    settings = settings_of(env)
    streams: dict[int, list[str]] = {}
    for n in range(400):
        streams.setdefault(stream_partition(f"{schema}-{n}", settings.event_partitions), []).append(f"{schema}-{n}")
    healthy = [p for p in range(settings.event_partitions) if p != 0]
    one_by_one = [streams[healthy[n % len(healthy)]][n // len(healthy)] for n in range(24)]
    await migrate(settings.database_url, schema)
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": schema})
    try:
        await conn.execute("INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, last_sha256, "
                           "updated_at) VALUES ($1, $2, 0, 1000, $3, now())", settings.consumer_group,
                           settings.events_topic, "0" * 64)
        async with EventProducer(settings) as producer, running_worker(env):
            await producer.append(streams[0][0], "execution.started", {"workflow": "held"})
            problem = await poll(lambda: conn.fetchval("SELECT problem FROM log_problems WHERE partition = 0"), 60,
                                 "partition 0 held back")
            assert "ends at offset" in problem, problem
            deadline = time.monotonic() + 45  # generous: at the old pace, one event every 5 s, it takes 2 minutes
            for n, stream in enumerate(one_by_one):
                await producer.append(stream, "execution.started", {"workflow": "healthy"})

                async def projected(stream: str = stream) -> bool:
                    return bool(await conn.fetchval("SELECT count(*) FROM audit_log WHERE stream_id = $1", stream))

                await poll(projected, max(deadline - time.monotonic(), 0.0),
                           f"event {n + 1} of {len(one_by_one)}, appended one after another, projected")
            assert not await conn.fetchval("SELECT count(*) FROM audit_log WHERE stream_id = $1", streams[0][0])
    finally:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()
