"""Redis of a test's own, killed or brought back with older data while producers run: no stream forks, and every
acknowledged append is in the log."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import psutil
import pytest

from runledger.schemas.chain import verify_chain
from runledger.schemas.errors import TransientError
from runledger.streams.dev import devstack
from runledger.streams.producer.client import EventProducer
from runledger.streams.producer.events import NewEvent
from tests.conftest import free_ports
from tests.integration.conftest import CHILD, poll, read_log, settings_of

pytestmark = pytest.mark.slow

STREAMS = [f"exec-{i}" for i in range(4)]


@pytest.fixture
def own_redis(tmp_path: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The session's broker; an embedded Redis of this test's own, as `dev up` and compose.yaml run it (append-only
    file, synced on every write)."""
    (port,) = free_ports(1)
    env = {**env, "RUNLEDGER_EMBEDDED": "redis", "RUNLEDGER_STATE_DIR": str(tmp_path / "state"),
           "RUNLEDGER_REDIS_URL": f"redis://127.0.0.1:{port}/0", "RUNLEDGER_PRODUCER_LEASE_MS": "1000"}
    devstack.up(settings_of(env))
    yield env
    devstack.down(settings_of(env), purge=True)


def _step(i: int) -> NewEvent:
    return NewEvent("step.started", {"step_id": f"s{i}", "name": "n"})


async def _steps(producer: EventProducer, i: int) -> list[int]:
    """Step ``i`` appended to each stream, as a caller does: again after a TransientError (the connections the
    producer held to the Redis that stopped fail once); the seq of each."""
    seqs = []
    for stream in STREAMS:
        for attempt in range(3):
            try:
                seqs.append((await producer.append_batch(stream, [_step(i)]))[0].seq)
                break
            except TransientError:
                if attempt == 2:
                    raise
    return seqs


async def test_redis_back_with_older_data_is_recovered_before_the_next_append_of_a_running_producer(
        own_redis: dict[str, str], tmp_path: Path) -> None:
    """As after a failover to a replica that lagged, or a restore: the heads of the last appends are gone, and so
    are the appends' idempotency keys. The producer, started before and with no sweep round due, learns it from the
    run id its append's script sees."""
    settings = settings_of({**own_redis, "RUNLEDGER_PRODUCER_SWEEP_S": "3600"})
    data, older = settings.state_dir / "redis", tmp_path / "older"
    async with EventProducer(settings) as producer:
        for stream in STREAMS:
            await producer.append_batch(stream, [NewEvent("execution.started", {"workflow": "w"}), _step(1)])
        devstack.down(settings)
        shutil.copytree(data, older)  # the heads at seq 2
        devstack.up(settings)
        assert await _steps(producer, 2) == [3] * len(STREAMS)
        devstack.down(settings)
        shutil.rmtree(data)
        shutil.copytree(older, data)
        devstack.up(settings)  # back at seq 2, while the log is at seq 3
        assert await _steps(producer, 3) == [4] * len(STREAMS)
    events = [orjson.loads(r.value) for r in await read_log(settings)]
    assert verify_chain(events) == []
    assert sorted((e["subject"], e["seq"]) for e in events) == [(s, n) for s in STREAMS for n in range(1, 5)]


async def _read_acks(child: asyncio.subprocess.Process, acked: list[str]) -> None:
    assert child.stdout is not None
    async for line in child.stdout:
        acked.append(line.decode().split()[1])


async def test_redis_killed_under_appends_forks_nothing_and_keeps_every_acknowledged_append(
        own_redis: dict[str, str]) -> None:
    env = {**own_redis, "RUNLEDGER_PRODUCER_SWEEP_S": "0.5"}
    settings = settings_of(env)
    async with EventProducer(settings) as producer:
        await producer.append("shared", "execution.started", {"workflow": "w"})
    children = [await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), "retry", "shared", "150", env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE) for _ in range(3)]
    acked: list[str] = []
    readers = [asyncio.create_task(_read_acks(child, acked)) for child in children]
    # Their retries are logged on stderr: read from the start, so that no child blocks on a full pipe.
    errors = [asyncio.create_task(child.stderr.read()) for child in children if child.stderr is not None]
    try:
        await poll(lambda: asyncio.sleep(0, len(acked) >= 60), 120, "appends under way")
        pid = json.loads((settings.state_dir / "stack.json").read_text())["redis"]["pid"]
        os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(psutil.Process(pid).wait, 30)
        await asyncio.to_thread(devstack.up, settings)  # on its append-only file
        for child, error in zip(children, errors, strict=True):
            err = await asyncio.wait_for(error, 300)
            await asyncio.wait_for(child.wait(), 30)
            assert child.returncode == 0, err.decode()[-3000:]
        await asyncio.gather(*readers)
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
    events = {e["id"]: e for e in (orjson.loads(r.value) for r in await read_log(settings))}
    assert set(acked) <= set(events)  # every acknowledged append is in the log
    hashes: dict[int, set[str]] = {}
    for e in events.values():
        hashes.setdefault(e["seq"], set()).add(e["hash"])
    assert [seq for seq, found in hashes.items() if len(found) > 1] == []  # no fork
    assert verify_chain(sorted(events.values(), key=lambda e: e["seq"])) == []
    assert len(events) == 1 + 3 * 150  # each append once: its idempotency key outlived the kill
