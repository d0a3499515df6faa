"""Redis loses its chain heads (FLUSHALL, a restart without data): producers recover them from the log and never
start an existing stream again at seq 1, follow a fork's first branch in log order as workers do, read only the log
past the heads' checkpoints, one at a time and within a deadline; `runledger heads check` then reports clean."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
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
from runledger.streams.producer import logread
from runledger.streams.producer.client import EventProducer
from runledger.streams.producer.epoch import HeadsRecovering, epoch_key, read_epoch
from runledger.streams.producer.events import NewEvent
from runledger.streams.producer.recovery import recover_heads
from runledger.streams.settings import Settings
from tests.conftest import CLI, free_ports
from tests.integration.conftest import FIRST_STREAM, poll, read_log, rechain, rehashed, settings_of, write_log

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
    first = next(e for e in map(orjson.loads, (r.value for r in await read_log(settings)))
                 if (e["subject"], e["seq"]) == ("exec-0", 1))
    redis = Redis.from_url(settings.redis_url)
    try:  # as if Redis had come back from an older snapshot: one head behind the log, still marked complete
        await redis.hset(f"{settings.topic_prefix}:head:exec-0", mapping={"seq": 1, "hash": first["hash"]})
    finally:
        await redis.aclose()
    done = _heads_check(env)
    assert done.returncode == 1
    [row] = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert (row["stream"], row["redis"], row["log"]) == ("exec-0", 1, 2)
    assert "an append would fork it" in row["problems"][0]
    recovered = subprocess.run([*CLI, "heads", "recover", "--json"],
                               env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    out = orjson.loads(recovered.stdout)
    assert (out["streams"], out["moved"], out["records"]) == (len(STREAMS), 1, 2 * len(STREAMS))
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


def forked(subject: str) -> tuple[list[dict[str, object]], dict[str, object], dict[str, object]]:
    """A stream forked at seq 2, in log order: seq 1, seq 2, another seq 2 ground until its hash sorts before the
    first's, and a seq 3 on the ground one. Returns the four events, the first seq 2 and the ground one."""
    one, two, three = rechain(subject, FIRST_STREAM[:3])
    attempt = 0
    while (ground := rehashed(two, data={**two["data"], "name": f"ground-{attempt}"}))["hash"] >= two["hash"]:
        attempt += 1
    return [one, two, ground, rehashed(three, prevhash=ground["hash"])], two, ground


async def test_a_fork_ground_to_sort_first_is_recovered_onto_the_branch_first_in_the_log(settings: Settings) -> None:
    log, first, _ = forked("forked")
    await write_log(settings, log)
    async with EventProducer(settings) as producer:  # a prefix never used: Redis's heads are recovered first
        after = await producer.append("forked", "step.started", {"step_id": "s9", "name": "n"})
    assert after.seq == 3  # after the first seq 2, as a worker projects it (the ground seq 3 is chain_broken)
    assert orjson.loads(after.value)["prevhash"] == first["hash"]


async def _epoch_moved_to(settings: Settings, total: int) -> None:
    redis = Redis.from_url(settings.redis_url)
    try:
        async def moved() -> bool:
            return sum((await read_epoch(redis, settings.topic_prefix)).checkpoints.values()) == total

        await poll(moved, 30, f"the heads' checkpoints at the log's end ({total} records)")
    finally:
        await redis.aclose()


async def _restart_in_epoch(settings: Settings) -> None:
    """What Redis restarting means to the scripts: the epoch names a run id that is not this run's."""
    redis = Redis.from_url(settings.redis_url)
    try:
        await redis.hset(epoch_key(settings.topic_prefix), "run_id", "0" * 40)
    finally:
        await redis.aclose()


async def test_recovery_reads_only_the_log_past_the_heads_checkpoints(env: dict[str, str]) -> None:
    settings = settings_of({**env, "RUNLEDGER_PRODUCER_SWEEP_S": "0.2", "RUNLEDGER_PRODUCER_LEASE_MS": "500"})
    await _open_streams(settings)  # 12 events
    async with EventProducer(settings):  # its sweeper, elected, moves the checkpoints to the log's end
        await _epoch_moved_to(settings, 2 * len(STREAMS))
    assert await _continue_streams(settings.model_copy(update={"producer_sweep_s": 0}), 2) == [3] * len(STREAMS)
    await _restart_in_epoch(settings)
    redis = Redis.from_url(settings.redis_url)
    try:
        done = await recover_heads(redis, settings)
    finally:
        await redis.aclose()
    assert done is not None and (done.records, done.moved) == (len(STREAMS), set())
    assert await _continue_streams(settings, 3) == [4] * len(STREAMS)
    await _assert_one_chain_each(settings, 4)


async def test_a_recovery_cut_short_by_its_deadline_goes_on_from_where_it_stopped(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    await write_log(settings, [e for s in STREAMS for e in rechain(s, FIRST_STREAM[:3])])  # 18 records
    monkeypatch.setattr(logread, "_SLICE", 2)
    read_to_end, reads = logread.read_to_end, 0

    async def deadline_after_the_first_slice(*args: object, **kwargs: object) -> object:
        nonlocal reads
        reads += 1
        if reads > 1:
            raise TimeoutError  # as the deadline's timeout raises it
        return await read_to_end(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(logread, "read_to_end", deadline_after_the_first_slice)
    redis = Redis.from_url(settings.redis_url)
    try:
        with pytest.raises(HeadsRecovering, match="did not finish within"):
            await recover_heads(redis, settings, deadline=time.monotonic() + 60)
        epoch = await read_epoch(redis, settings.topic_prefix)
        assert not epoch.current and 0 < sum(epoch.checkpoints.values()) <= 2 * settings.event_partitions
        monkeypatch.setattr(logread, "read_to_end", read_to_end)
        done = await recover_heads(redis, settings.model_copy(update={"producer_lease_ms": 500}))
    finally:
        await redis.aclose()
    assert done is not None and done.starts == epoch.checkpoints
    assert done.records == 3 * len(STREAMS) - sum(epoch.checkpoints.values())
    assert await _continue_streams(settings, 9) == [4] * len(STREAMS)


async def test_an_append_waits_for_another_recoverer_no_longer_than_its_deadline(env: dict[str, str]) -> None:
    settings = settings_of({**env, "RUNLEDGER_PRODUCER_WAIT_S": "1"})
    lock = f"{settings.topic_prefix}:heads:recovering"
    redis = Redis.from_url(settings.redis_url)
    try:
        await redis.set(lock, "another producer, hung", px=120_000)
        async with EventProducer(settings) as producer:
            with pytest.raises(HeadsRecovering, match="another producer is recovering them"):
                async with asyncio.timeout(30):
                    await producer.append("exec-0", "execution.started", {"workflow": "w"})
        await redis.delete(lock)  # the other recoverer gone: the next append recovers (the log is read in time)
        async with EventProducer(settings.model_copy(update={"producer_wait_s": 30})) as producer:
            assert (await producer.append("exec-0", "execution.started", {"workflow": "w"})).seq == 1
    finally:
        await redis.aclose()
