"""Shared fixtures. Integration tests get the real embedded stack, started once per session.

The test stack has its own state directory and ports, so a developer's
``runledger dev up`` stack is never touched; each test gets its own topic
prefix (so its own topics and Redis keys).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from runledger.streams.dev import devstack
from runledger.streams.settings import DATABASE_PASSWORD_FILES, Settings

ROOT = Path(__file__).resolve().parent.parent
# The command line, run as a child process of this interpreter (the venv under test).
CLI = (sys.executable, "-m", "runledger.streams.cli")
VECTORS = ROOT / "tests" / "vectors" / "chain-v1.jsonl"
VECTOR_EVENTS = [orjson.loads(line)["event"] for line in VECTORS.read_bytes().splitlines()]

def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now, below the ephemeral range (which outgoing connections take from)."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 30999)  # noqa: S311 - not security
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


_KAFKA, _POSTGRES, _REDIS = free_ports(3)
_STATE = ROOT / ".runledger" / "test" / f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
TEST_ENV = {
    # A stack of the session's own: its own state and free ports, so that two suites, or a `dev up` stack on
    # any ports, never meet.
    "RUNLEDGER_STATE_DIR": str(_STATE),
    "RUNLEDGER_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{_KAFKA}",
    # The tests' own connections as the superuser (to look past triggers and privileges); runledger's workers,
    # waits and roles as in production, with the passwords `dev up` writes (named here, so that a test with a
    # state directory of its own still finds the session's).
    "RUNLEDGER_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{_POSTGRES}/runledger",
    **{f"RUNLEDGER_{setting.upper()}": str(_STATE / "secrets" / setting.removesuffix("_file").replace("_", "-"))
       for login, setting in DATABASE_PASSWORD_FILES.items() if login != "admin"},
    "RUNLEDGER_REDIS_URL": f"redis://127.0.0.1:{_REDIS}/0",
    "RUNLEDGER_EVENT_PARTITIONS": "4",
    # The session's broker keeps its log in memory, for speed; the durable log has tests of its own.
    "RUNLEDGER_KAFKA_STORAGE": "memory",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
    # The long scenarios first: run in parallel (./dev test), they then start at once instead of ending last.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def stack_env() -> Iterator[dict[str, str]]:
    """Environment of the session's embedded stack; started here, stopped at the end if started here."""
    env = {k: os.environ.get(k, v) for k, v in TEST_ENV.items()}
    settings = Settings(**{k.removeprefix("RUNLEDGER_").lower(): v for k, v in env.items()})
    started = [s.name for s in devstack.up(settings) if s.state == "started"]
    yield env
    if started:
        devstack.down(settings, purge=True)
        shutil.rmtree(settings.state_dir, ignore_errors=True)


@pytest.fixture
def env(stack_env: dict[str, str]) -> dict[str, str]:
    """RUNLEDGER_* variables for this test: the session stack plus a topic prefix of its own."""
    return {**stack_env, "RUNLEDGER_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:12]}"}


@pytest.fixture
def settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()
