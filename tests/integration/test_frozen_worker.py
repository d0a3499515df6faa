"""A worker frozen with its batch's locks held (SIGSTOP: what a VM freeze or a network partition leaves behind)
stalls no other: PostgreSQL ends its session once it has idled in its transaction for
RUNLEDGER_DB_IDLE_IN_TRANSACTION_TIMEOUT_S, which releases its locks, and once the group has rebalanced the other
worker projects the frozen one's partitions too: within 10 s of the freeze, with nothing forwarded to the retry
topics (a wait for those locks is bounded and tried again in place: ``projections/test_lock_bounds.py``).
Without those bounds the other worker waits on the frozen one's locks until its connection dies (hours)."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from runledger.projections.postgres.db import migrate
from runledger.streams.settings import Settings
from runledger.streams.topics import ensure_topics
from runledger.streams.worker.retry import RetrySchedule
from tests.integration.conftest import poll, read_log, rechain, running_worker, settings_of, worker_log
from tests.integration.deadletters.test_nothing_stops_a_worker import PARTITIONS, _key_on

ASSIGNED = re.compile(r"assigned partitions \[([0-9, ]*)\]")
TAKEOVER_S = 10  # the bound, from the freeze to everything projected by the other worker


def _assignment(worker: subprocess.Popen[bytes]) -> set[int] | None:
    found = ASSIGNED.findall(worker_log(worker))
    return {int(p) for p in found[-1].split(",") if p.strip()} if found else None


def _stopped(worker: subprocess.Popen[bytes]) -> bool:
    """The process is stopped (state T in /proc): it stopped itself with its batch's locks held."""
    stat = Path(f"/proc/{worker.pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def _wave(tag: str) -> list[dict[str, Any]]:
    """Two streams of nine events on every partition of the log."""
    return [e for p in range(PARTITIONS) for n in range(2) for e in rechain(_key_on(p, f"{tag}-{n}"))]


async def _send(producer: AIOKafkaProducer, settings: Settings, events: list[dict[str, Any]]) -> None:
    futures = [await producer.send(settings.events_topic, orjson.dumps(e), key=e["subject"].encode()) for e in events]
    for future in futures:
        await future


@pytest.mark.slow
async def test_a_worker_frozen_with_its_locks_held_stalls_no_other(env: dict[str, str]) -> None:
    schema = f"fz_{uuid.uuid4().hex[:10]}"
    env = {**env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}",
           # Bounds short enough for the whole takeover to fit in the 10 s (the defaults: 6, 5 and 10 s).
           "RUNLEDGER_WORKER_SESSION_TIMEOUT_S": "3", "RUNLEDGER_DB_LOCK_TIMEOUT_S": "0.5",
           "RUNLEDGER_DB_IDLE_IN_TRANSACTION_TIMEOUT_S": "4"}
    settings = settings_of(env)
    await ensure_topics(settings, {settings.events_topic: PARTITIONS})
    await migrate(settings.database_url, schema)
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": schema})
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_idempotence=False)
    await producer.start()

    async def projected() -> int:
        return int(await conn.fetchval("SELECT count(*) FROM audit_log"))

    try:
        async with running_worker(env, loglevel="info") as other, running_worker(
                {**env, "RUNLEDGER_TEST_STOP_AFTER_LOCKS": "true"}, loglevel="info") as frozen:

            async def split() -> bool:
                a, b = _assignment(other), _assignment(frozen)
                return bool(a and b and not a & b and a | b == set(range(PARTITIONS)))

            async def stopped() -> bool:
                return _stopped(frozen)

            try:
                await poll(split, 120, "the two workers to split the partitions")
                first = _wave("before")
                await _send(producer, settings, first)
                await poll(stopped, 60, "a worker stopped with its batch's locks held")
                frozen_at = time.monotonic()
                second = _wave("after")
                await _send(producer, settings, second)
                total = len(first) + len(second)

                async def all_projected() -> bool:
                    return await projected() == total

                await poll(all_projected, TAKEOVER_S - (time.monotonic() - frozen_at),
                           f"all {total} events projected within {TAKEOVER_S} s of the freeze")
                assert _stopped(frozen), "the frozen worker must still be stopped: the other did it all"
                assert _assignment(other) == set(range(PARTITIONS))
                assert "stopping this process (SIGSTOP) with its batch's locks held" in worker_log(frozen)
                assert "went to the retry topics" not in worker_log(other)
            finally:
                frozen.send_signal(signal.SIGKILL)  # still stopped: SIGTERM would wait for a SIGCONT
        rows = await conn.fetch("SELECT stream_id, seq FROM audit_log")
        assert len(rows) == len(set(rows)) == total
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
        assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0
        for _, topic in RetrySchedule(settings.topic_prefix, settings.retry_delays).topics:
            assert await read_log(settings, topic) == [], f"records forwarded to {topic}"
    finally:
        await producer.stop()
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()
