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
from runledger.schemas.checkpoint import Signer
from runledger.streams.dev.fleet import simulate_fleet
from runledger.streams.producer.client import EventProducer
from runledger.streams.settings import Settings
from tests.conftest import CLI
from tests.integration.conftest import poll, read_log

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
