"""Read-your-writes: ``wait_projected`` and ``runledger wait`` against real tables and a real store."""

from __future__ import annotations

import asyncio
import os
import subprocess

import asyncpg
import orjson

from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.postgres.wait import wait_projected
from runledger.schemas.chain import compute_hash
from runledger.streams.settings import Settings
from tests.conftest import CLI
from tests.integration.projections.test_store import VECTOR_VALUES, records

STREAM = "exec-2026-11-22-0001"  # seq 1..9 in the vectors
FIRST = [v for v in VECTOR_VALUES if orjson.loads(v)["subject"] == STREAM]


def rehashed(value: bytes, **changes: object) -> bytes:
    raw = {**orjson.loads(value), **changes}
    raw["hash"] = compute_hash(raw)
    return orjson.dumps(raw)


async def test_a_waiter_returns_once_the_event_is_projected(settings: Settings, store: ProjectionStore,
                                                            schema: str) -> None:
    waiter = asyncio.create_task(wait_projected(settings.database_url, schema, STREAM, 9, timeout=30))
    await asyncio.sleep(0.3)  # the waiter is listening before anything is applied
    assert not waiter.done()
    await store.apply_batch(records(VECTOR_VALUES))
    result = await asyncio.wait_for(waiter, 10)
    last = orjson.loads(FIRST[-1])
    assert (result.status, result.event_id, result.hash, result.head_seq) == ("projected", last["id"],
                                                                              last["hash"], 9)


async def test_a_rejected_event_says_why(settings: Settings, store: ProjectionStore, schema: str) -> None:
    forged = rehashed(FIRST[1], prevhash="f" * 64)  # seq 2 that does not link to seq 1
    await store.apply_batch(records([FIRST[0], forged]))
    result = await wait_projected(settings.database_url, schema, STREAM, 2, event_id=orjson.loads(forged)["id"],
                                  timeout=5)
    assert (result.status, result.reason, result.head_seq) == ("rejected", "chain_broken", 1)
    assert "prevhash" in (result.error or "")


async def test_a_timeout_says_what_the_event_waits_for(settings: Settings, store: ProjectionStore,
                                                       schema: str) -> None:
    await store.apply_batch(records([FIRST[0], FIRST[2]]))  # seq 2 missing: seq 3 is parked
    parked = await wait_projected(settings.database_url, schema, STREAM, 3, timeout=0.5)
    assert (parked.status, parked.head_seq) == ("timeout", 1)
    assert "parked" in (parked.error or "") and parked.waited_s >= 0.5
    missing = await wait_projected(settings.database_url, schema, STREAM, 2, timeout=0.2)
    assert missing.status == "timeout" and "projected up to seq 1" in (missing.error or "")
    other = await wait_projected(settings.database_url, schema, STREAM, 1,
                                 event_id="00000000-0000-4000-8000-000000000000", timeout=0.2)
    assert other.status == "timeout" and "another event" in (other.error or "")


async def test_the_wait_command_exit_status_tells_the_outcome(env: dict[str, str], store: ProjectionStore,
                                                              schema: str) -> None:
    await store.apply_batch(records(FIRST[:3]))
    run_env = {**os.environ, **env, "RUNLEDGER_DB_SCHEMA": schema}

    def wait(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "wait", *args], env=run_env,
                              capture_output=True, text=True, timeout=60)

    done = await asyncio.to_thread(wait, STREAM, "3", "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["event_id"] == orjson.loads(FIRST[2])["id"]
    late = await asyncio.to_thread(wait, STREAM, "4", "--timeout", "0.3")
    assert late.returncode == 4 and "timed out" in late.stdout
    bad = await asyncio.to_thread(wait, STREAM, "4", "--id", "nope")
    assert bad.returncode == 2 and "id: 'nope' is not a UUID" in bad.stderr


async def test_a_wait_says_when_no_worker_of_the_group_is_running(settings: Settings, pool: asyncpg.Pool,
                                                                  schema: str) -> None:
    notes: list[str] = []
    result = await wait_projected(settings.database_url, schema, STREAM, 1, timeout=1, group_id="g-none",
                                  topic="t.events", note=notes.append)
    assert result.status == "timeout" and "no worker of group g-none is running" in (result.error or "")
    assert len(notes) == 1 and "runledger worker" in notes[0]
    # A worker that says it is alive silences it.
    await pool.execute("INSERT INTO workers (worker_id, group_id, host, pid, started_at, seen_at) "
                              "VALUES ('w1', 'g-live', 'h', 1, now(), now())")
    notes.clear()
    result = await wait_projected(settings.database_url, schema, STREAM, 1, timeout=1, group_id="g-live",
                                  topic="t.events", note=notes.append)
    assert result.status == "timeout" and "no worker" not in (result.error or "") and notes == []
