"""The per-source token bucket in the real Redis (shared by replicas), and serve's least-privileged login."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from runledger.streams.http.caller import Caller
from runledger.streams.http.problems import Problem
from runledger.streams.http.ratelimit import take_tokens
from runledger.streams.http.services import Services
from runledger.streams.settings import Settings
from tests.integration.conftest import poll, settings_of
from tests.integration.httpapi.serving import migrated

pytestmark = pytest.mark.timeout(120)


def replica(settings: Settings, redis: Redis) -> Services:
    """A replica's services as far as the rate limit needs them: its settings and its own Redis client."""
    none: Any = None
    return Services(settings, none, none, redis)


async def test_the_bucket_is_shared_by_replicas_refuses_with_429_and_refills(settings: Settings) -> None:
    one, two = Redis.from_url(settings.redis_dsn), Redis.from_url(settings.redis_dsn)
    try:
        a, b = replica(settings, one), replica(settings, two)
        who = Caller("fleet", "/producers/fleet", ("fleet/",), ("",), rate_per_s=2.0, burst=5)
        await take_tokens(a, who, 3)
        await take_tokens(b, who, 2)  # the other replica sees the same bucket: 5 taken, none left
        with pytest.raises(Problem) as refused:
            await take_tokens(a, who, 1)
        assert refused.value.status == 429 and refused.value.code == "rate_limited"
        assert int(refused.value.headers["Retry-After"]) >= 1
        with pytest.raises(Problem):
            await take_tokens(b, who, 1)
        other = Caller("other", "/producers/other", rate_per_s=2.0, burst=5)
        await take_tokens(b, other, 5)  # each source its own bucket
        with pytest.raises(Problem) as too_many:
            await take_tokens(a, who, 6)  # more than the burst: never
        assert "burst" in too_many.value.detail

        started = time.monotonic()

        async def refilled() -> bool:
            try:
                await take_tokens(a, who, 2)
            except Problem:
                return False
            return True

        await poll(refilled, 10, "two tokens to come back at 2 a second")
        assert time.monotonic() - started > 0.5, "tokens came back faster than the rate"
        await take_tokens(a, Caller("free", "/producers/free"), 10_000)  # no limit set: always passes
    finally:
        await one.aclose()
        await two.aclose()


async def test_serve_logs_in_as_runledger_api_which_reads_and_writes_nothing(env: dict[str, str]) -> None:
    env = await migrated(env)
    settings = settings_of(env)
    conn = await asyncpg.connect(settings.database_dsn("api"),
                                 server_settings={"search_path": settings.db_schema})
    try:
        assert await conn.fetchval("SELECT session_user") == "runledger_api"
        for table in ("executions", "steps", "costs", "artifacts", "audit_log", "checkpoints", "sources",
                      "source_secrets", "log_tree_nodes"):
            await conn.fetch(f"SELECT * FROM {table} LIMIT 1")  # noqa: S608 - fixed names
        for table in ("dead_letters", "consumer_offsets", "outbox", "parked_events", "schema_migrations"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch(f"SELECT * FROM {table} LIMIT 1")  # noqa: S608
        assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
        await conn.execute("SET default_transaction_read_only = off")  # the privileges alone refuse the writes
        for statement in ("DELETE FROM executions", "UPDATE sources SET revoked_at = now()",
                          "INSERT INTO audit_log (stream_id) VALUES ('x')", "DELETE FROM source_secrets"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SELECT pg_advisory_lock(1)")
    finally:
        await conn.close()
