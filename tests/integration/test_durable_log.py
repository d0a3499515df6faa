"""The embedded broker keeps the log on disk (Tansu's S3 engine on s3rver): across `dev down`/`dev up` and a
kill -9 of the broker, every event stays, chains go on at the right seq, and the projection can be rebuilt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import orjson
import pytest

from runledger.schemas.chain import verify_chain
from runledger.streams.dev import devstack
from runledger.streams.producer.client import EventProducer
from runledger.streams.producer.events import NewEvent
from tests.conftest import CLI, free_ports
from tests.integration.conftest import poll, read_log, running_worker, settings_of

STREAMS = [f"run-{i:02d}" for i in range(20)]


@pytest.fixture
def durable(tmp_path: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The session's PostgreSQL; a broker with its log on disk, and Redis, of this test's own."""
    kafka, redis = free_ports(2)
    schema = f"dur_{uuid.uuid4().hex[:10]}"
    env = {**env, "RUNLEDGER_STATE_DIR": str(tmp_path), "RUNLEDGER_EMBEDDED": "kafka,redis",
           "RUNLEDGER_KAFKA_STORAGE": "s3", "RUNLEDGER_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka}",
           "RUNLEDGER_REDIS_URL": f"redis://127.0.0.1:{redis}/0", "RUNLEDGER_DB_SCHEMA": schema,
           "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}"}
    devstack.up(settings_of(env))
    yield env
    devstack.down(settings_of(env), purge=True)


def runledger(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


async def _append(env: dict[str, str], first: int, count: int) -> list[int]:
    """``count`` events on each stream from step ``first``; returns each stream's last seq."""
    async with EventProducer(settings_of(env)) as producer:
        last = []
        for stream in STREAMS:
            events = [NewEvent("step.started", {"step_id": f"s{i}", "name": "n"}) for i in range(first, first + count)]
            if first == 0:
                events[0] = NewEvent("execution.started", {"workflow": "w"})
            last.append((await producer.append_batch(stream, events))[-1].seq)
        return last


async def _projected(env: dict[str, str], total: int) -> None:
    settings = settings_of(env)
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": settings.db_schema})
    try:
        async def done() -> bool:
            try:
                return await conn.fetchval("SELECT count(*) FROM audit_log") == total
            except asyncpg.UndefinedTableError:
                return False

        async with running_worker(env):
            await poll(done, 120, f"{total} events projected")
    finally:
        await conn.close()


async def _log_is_whole(env: dict[str, str], total: int) -> None:
    events = [orjson.loads(r.value) for r in await read_log(settings_of(env))]
    assert len(events) == total and verify_chain(events) == []


async def test_the_log_survives_dev_down_and_a_killed_broker(durable: dict[str, str]) -> None:
    env = durable
    assert await _append(env, 0, 50) == [50] * len(STREAMS)  # 1,000 events
    assert runledger(env, "dev", "down").returncode == 0
    status = runledger(env, "dev", "up")
    assert status.returncode == 0 and "log on disk" in status.stdout, status.stdout + status.stderr
    await _log_is_whole(env, 1000)
    assert await _append(env, 50, 5) == [55] * len(STREAMS)  # each chain goes on at the right seq
    await _projected(env, 1100)
    rebuilt = runledger(env, "rebuild", "--no-switch", "--json")
    assert rebuilt.returncode == 0 and orjson.loads(rebuilt.stdout)["equal"], rebuilt.stdout + rebuilt.stderr

    # The broker killed, not stopped; its log store lives on and the broker comes back on it.
    state = json.loads((Path(env["RUNLEDGER_STATE_DIR"]) / "stack.json").read_text())
    os.kill(state["kafka"]["pid"], signal.SIGKILL)
    assert runledger(env, "dev", "up").returncode == 0
    await _log_is_whole(env, 1100)
    assert await _append(env, 55, 5) == [60] * len(STREAMS)
    await _projected(env, 1200)
    check = runledger(env, "heads", "check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_demo_then_dev_down_then_demo_again_counts_both_runs(durable: dict[str, str]) -> None:
    env = durable
    first = runledger(env, "demo", "--executions", "5", "--timeout", "200")
    assert first.returncode == 0, first.stderr[-3000:]
    assert runledger(env, "dev", "down").returncode == 0
    second = runledger(env, "demo", "--executions", "5", "--timeout", "200")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "the record holds 10 executions" in second.stdout, second.stdout[-2000:]


def test_the_log_store_closes_the_file_of_a_not_modified_answer(durable: dict[str, str], tmp_path: Path) -> None:
    """The broker polls its watermarks with conditional GETs: each answered 304 once leaked a file descriptor of
    s3rver, which ran out within the hour and stopped every fetch (streams/dev/s3rver_fds.js)."""
    store = json.loads((tmp_path / "stack.json").read_text())["kafka"]["store"]
    url = f"http://127.0.0.1:{store['port']}/tansu/fd-probe/{uuid.uuid4().hex}.json"
    urllib.request.urlopen(urllib.request.Request(url, data=b"{}", method="PUT"), timeout=10).close()
    with urllib.request.urlopen(url, timeout=10) as answer:
        etag = answer.headers["ETag"]

    def not_modified(headers: dict[str, str]) -> None:
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
        answer.value.close()
        assert answer.value.code == 304

    fds = Path(f"/proc/{store['pid']}/fd")
    before = len(list(fds.iterdir()))
    for _ in range(100):
        not_modified({"If-None-Match": etag})
        not_modified({"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"})
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.read() == b"{}"  # a plain GET still sends the object
    assert len(list(fds.iterdir())) < before + 20, "s3rver keeps the files of its 304 answers open"
