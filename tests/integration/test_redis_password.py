"""Redis with a password, as compose.yaml runs it (requirepass from a file): the producer logs in with the password of
RUNLEDGER_REDIS_PASSWORD_FILE, is refused without it, and no Redis error shows a password."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runledger.schemas.errors import TransientError
from runledger.streams.dev.devstack import _redis_binary
from runledger.streams.dev.fleet import simulate_fleet
from runledger.streams.producer.client import EventProducer
from tests.conftest import free_ports
from tests.integration.conftest import settings_of

PASSWORD = "r3dis-p@ss"


@pytest.fixture
def guarded_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A Redis of the test's own that wants ``PASSWORD`` (its URL, and the file holding the password)."""
    [port] = free_ports(1)
    secret = tmp_path / "redis_password"
    secret.write_text(PASSWORD + "\n")
    conf = tmp_path / "redis-auth.conf"
    conf.write_text(f"requirepass {PASSWORD}\n")  # as compose.yaml's redis service writes it
    server = subprocess.Popen([_redis_binary(), str(conf), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", secret
    finally:
        server.terminate()
        server.wait(10)


async def test_the_producer_logs_in_to_redis_with_the_password_of_its_file(
        env: dict[str, str], guarded_redis: tuple[str, Path]) -> None:
    url, secret = guarded_redis
    run = simulate_fleet(1, seed=11, run_tag=env["RUNLEDGER_TOPIC_PREFIX"])[0]
    settings = settings_of({**env, "RUNLEDGER_REDIS_URL": url, "RUNLEDGER_REDIS_PASSWORD_FILE": str(secret)})
    async with EventProducer(settings) as producer:
        appended = await producer.append_batch(run.stream_id, run.events[:2])
    assert [a.seq for a in appended] == [1, 2]

    without = EventProducer(settings_of({**env, "RUNLEDGER_REDIS_URL": url}))
    with pytest.raises(TransientError, match=r"cannot reach Redis at redis://127\.0\.0\.1") as refused:
        await without.start()
    await without.stop()
    assert "authenticated" in str(refused.value)


async def test_a_redis_error_never_shows_the_password(env: dict[str, str]) -> None:
    [port] = free_ports(1)  # nothing listens there
    producer = EventProducer(settings_of({**env, "RUNLEDGER_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:{port}/0"}))
    with pytest.raises(TransientError) as failed:
        await asyncio.wait_for(producer.start(), 60)
    await producer.stop()
    assert PASSWORD not in str(failed.value) and f"redis://:***@127.0.0.1:{port}/0" in str(failed.value)
