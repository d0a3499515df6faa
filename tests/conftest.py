"""Shared fixtures. Integration tests get the real embedded stack, started once per session.

The test stack has its own state directory and ports, so a developer's
``runledger dev up`` stack is never touched; each test gets its own topic
prefix (so its own topics and Redis keys).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from streams import devstack
from streams.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors" / "chain-v1.jsonl"
VECTOR_EVENTS = [orjson.loads(line)["event"] for line in VECTORS.read_bytes().splitlines()]

TEST_ENV = {
    "RUNLEDGER_STATE_DIR": str(ROOT / ".runledger" / "test"),
    "RUNLEDGER_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:29092",
    "RUNLEDGER_DATABASE_URL": "postgresql://postgres@127.0.0.1:25432/runledger",
    "RUNLEDGER_REDIS_URL": "redis://127.0.0.1:26379/0",
    "RUNLEDGER_EVENT_PARTITIONS": "4",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack_env() -> Iterator[dict[str, str]]:
    """Environment of the session's embedded stack; started here, stopped at the end if started here."""
    env = {k: os.environ.get(k, v) for k, v in TEST_ENV.items()}
    settings = Settings(**{k.removeprefix("RUNLEDGER_").lower(): v for k, v in env.items()})
    started = [s.name for s in devstack.up(settings) if s.state == "started"]
    yield env
    if started:
        devstack.down(settings)


@pytest.fixture
def env(stack_env: dict[str, str]) -> dict[str, str]:
    """RUNLEDGER_* variables for this test: the session stack plus a topic prefix of its own."""
    return {**stack_env, "RUNLEDGER_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:12]}"}


@pytest.fixture
def settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()
