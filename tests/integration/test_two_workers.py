"""Two ``runledger worker`` processes on one consumer group share the partitions and project once."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import asyncpg

from runledger.projections.postgres.db import migrate
from runledger.streams.dev.fleet import simulate_fleet
from runledger.streams.producer.client import append_many
from runledger.streams.settings import Settings
from runledger.streams.tools.rebuild import rebuild
from runledger.streams.topics import ensure_topics
from tests.conftest import CLI

ASSIGNED = re.compile(r"assigned partitions \[([0-9, ]*)\]")


def last_assignment(log: Path) -> set[int] | None:
    found = ASSIGNED.findall(log.read_text(errors="replace"))
    return {int(p) for p in found[-1].split(",") if p.strip()} if found else None


async def test_two_workers_split_the_partitions_and_project_everything_once(
        env: dict[str, str], settings: Settings, tmp_path: Path) -> None:
    schema = f"w2_{uuid.uuid4().hex[:10]}"
    env = {**env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}"}
    settings = settings.model_copy(update={"db_schema": schema, "consumer_group": f"g-{schema}"})
    await ensure_topics(settings, {settings.events_topic: settings.event_partitions})
    await migrate(settings.database_url, schema)  # the owner's work: a worker's login applies no migration
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    workers = []
    for log in logs:
        with log.open("wb") as out:  # the child has its own copy of the descriptor
            workers.append(subprocess.Popen([*CLI, "worker", "--loglevel", "info"],
                                            env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT))
    conn = await asyncpg.connect(settings.database_url)
    try:
        everything = set(range(settings.event_partitions))
        deadline = time.monotonic() + 120
        while True:  # until the group settles: each worker some partitions, none shared, none left out
            split = [last_assignment(log) for log in logs]
            if all(split) and not (split[0] & split[1]) and split[0] | split[1] == everything:  # type: ignore[operator]
                break
            assert all(w.poll() is None for w in workers), [log.read_text() for log in logs]
            assert time.monotonic() < deadline, f"no split after 120 s: {split}"
            await asyncio.sleep(0.5)

        fleet = simulate_fleet(80, seed=11, run_tag=schema)
        total = sum(len(r.events) for r in fleet)
        await append_many(settings, [(r.stream_id, e) for r in fleet for e in r.events], progress=False)
        deadline = time.monotonic() + 120
        while (projected := await conn.fetchval(f'SELECT count(*) FROM "{schema}".audit_log')) < total:
            assert time.monotonic() < deadline, f"{projected} of {total} projected"
            await asyncio.sleep(0.3)
        assert [last_assignment(log) for log in logs] == split, "the group rebalanced while projecting"
        partitions = {r["kafka_partition"] for r in await conn.fetch(
            f'SELECT DISTINCT kafka_partition FROM "{schema}".audit_log')}
        assert partitions & split[0] and partitions & split[1]  # type: ignore[operator]  # both did work
        assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".executions') == 80
        assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".dead_letters') == 0
        # Exactly once: the tables equal one fresh projection of the whole log, row for row.
        report = await rebuild(settings, switch=False)
        assert report.equal and report.checksums["audit_log"][1][0] == total, report.as_dict()
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            await asyncio.to_thread(worker.wait, 30)
        for (name,) in await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", f"{schema}%"):
            await conn.execute(f'DROP SCHEMA "{name}" CASCADE')
        await conn.close()
