"""Redis loses its chain heads (FLUSHALL, a restart without data): producers recover them from the log and never
start an existing stream again at seq 1; `runledger heads check` then reports clean."""

from __future__ import annotations

import os
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from runledger.projections.postgres.db import migrate
from runledger.schemas.chain import verify_chain
from runledger.streams.dev import devstack
from runledger.streams.producer.client import EventProducer
from runledger.streams.producer.events import NewEvent
from runledger.streams.settings import Settings
from tests.conftest import CLI, free_ports
from tests.integration.conftest import read_log

STREAMS = [f"exec-{i}" for i in range(6)]


def _step(i: int) -> NewEvent:
    return NewEvent("step.started", {"step_id": f"s{i}", "name": "n"})


async def _open_streams(settings: Settings) -> None:
    async with EventProducer(settings) as producer:
        for stream in STREAMS:
            await producer.append(stream, "execution.started", {"workflow": "w"})
            await producer.append_batch(stream, [_step(1)])


async def _continue_streams(settings: Settings, step: int) -> list[int]:
    async with EventProducer(settings) as producer:
        return [(await producer.append_batch(stream, [_step(step)]))[0].seq for stream in STREAMS]


def _heads_check(env: dict[str, str], schema: str | None = None) -> subprocess.CompletedProcess[str]:
    """``runledger heads check --json`` against PostgreSQL's heads in ``schema``; by default a schema never
    migrated, whose heads cannot be read: Redis and the log alone are compared."""
    schema = schema or f"never_{uuid.uuid4().hex[:12]}"
    return subprocess.run([*CLI, "heads", "check", "--json"], env={**os.environ, **env, "RUNLEDGER_DB_SCHEMA": schema},
                          capture_output=True, text=True, timeout=120)


async def _assert_one_chain_each(settings: Settings, length: int) -> None:
    events = [orjson.loads(r.value) for r in await read_log(settings)]
    assert verify_chain(events) == []  # no fork: every seq once, every link whole
    assert sorted((e["subject"], e["seq"]) for e in events) == [
        (s, n) for s in STREAMS for n in range(1, length + 1)]


async def test_after_flushall_every_stream_goes_on_at_its_seq(env: dict[str, str], settings: Settings) -> None:
    await _open_streams(settings)
    redis = Redis.from_url(settings.redis_url)
    try:
        await redis.flushall()
    finally:
        await redis.aclose()
    assert await _continue_streams(settings, 2) == [3] * len(STREAMS)  # not 1: recovered from the log
    await _assert_one_chain_each(settings, 3)
    done = _heads_check(env)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


@pytest.mark.slow
async def test_after_a_redis_restart_without_its_data_every_stream_goes_on(
        tmp_path: Path, env: dict[str, str]) -> None:
    (port,) = free_ports(1)
    env = {**env, "RUNLEDGER_EMBEDDED": "redis", "RUNLEDGER_STATE_DIR": str(tmp_path),
           "RUNLEDGER_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    settings = Settings(**{k.removeprefix("RUNLEDGER_").lower(): v for k, v in env.items()})
    devstack.up(settings)
    try:
        await _open_streams(settings)
        devstack.down(settings)
        devstack.up(settings)  # with its append-only file: the heads are still there
        assert await _continue_streams(settings, 2) == [3] * len(STREAMS)
        devstack.down(settings, purge=True)  # and now without its data
        devstack.up(settings)
        assert await _continue_streams(settings, 3) == [4] * len(STREAMS)
        await _assert_one_chain_each(settings, 4)
        done = _heads_check(env)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        devstack.down(settings, purge=True)


async def test_heads_check_names_a_head_behind_the_log(env: dict[str, str], settings: Settings) -> None:
    await _open_streams(settings)
    redis = Redis.from_url(settings.redis_url)
    try:  # as if Redis had come back from an older snapshot: one head behind the log, still marked complete
        await redis.hset(f"{settings.topic_prefix}:head:exec-0", mapping={"seq": 1})
    finally:
        await redis.aclose()
    done = _heads_check(env)
    assert done.returncode == 1
    [row] = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert (row["stream"], row["redis"], row["log"]) == ("exec-0", 1, 2)
    assert "an append would fork it" in row["problems"][0]
    recovered = subprocess.run([*CLI, "heads", "recover", "--json"],
                               env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert orjson.loads(recovered.stdout) == {"streams": len(STREAMS), "moved": 1}
    assert _heads_check(env).returncode == 0


async def test_heads_check_compares_postgresql_heads_with_the_log(env: dict[str, str], settings: Settings) -> None:
    await _open_streams(settings)
    last = {e["subject"]: e["hash"] for e in sorted((orjson.loads(r.value) for r in await read_log(settings)),
                                                     key=lambda e: e["seq"])}
    schema = f"heads_{uuid.uuid4().hex[:12]}"
    await migrate(settings.database_url, schema)
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": schema})
    try:  # exec-0 at the log's seq on another chain, exec-1 agreeing, exec-2 beyond the log; no head for the rest
        now = datetime.now(UTC)
        await conn.executemany("INSERT INTO stream_heads (stream_id, seq, hash, updated_at) VALUES ($1, $2, $3, $4)",
                               [("exec-0", 2, "f" * 64, now), ("exec-1", 2, last["exec-1"], now),
                                ("exec-2", 3, last["exec-2"], now)])
        done = _heads_check(env, schema)
    finally:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()
    assert done.returncode == 1
    rows = {row["stream"]: row for row in map(orjson.loads, done.stdout.splitlines())}
    assert sorted(rows) == ["exec-0", "exec-2", "exec-3", "exec-4", "exec-5"]
    assert (rows["exec-0"]["projected"], rows["exec-0"]["log"]) == (2, 2)
    assert rows["exec-0"]["problems"] == [f"PostgreSQL's head at seq 2 has hash {'f' * 64}, the log's event at seq 2 "
                                          f"hashes to {last['exec-0']}: the projection followed another chain"]
    assert rows["exec-2"]["problems"] == ["PostgreSQL projected seq 3, beyond the log's 2"]
    for stream in ("exec-3", "exec-4", "exec-5"):
        assert rows[stream]["projected"] is None
        assert rows[stream]["problems"] == ["PostgreSQL has no head for the stream, the log is at seq 2: workers "
                                            "may simply be behind, or its first event was dead-lettered"]
