"""The per-source token bucket in the real Redis (shared by replicas), and serve's least-privileged login."""

from __future__ import annotations

import time

import asyncpg
import pytest

from runledger.streams.http.caller import Caller
from runledger.streams.http.problems import Problem
from runledger.streams.http.ratelimit import admission, refused_over_limit
from runledger.streams.http.services import Services
from runledger.streams.producer.client import EventProducer
from runledger.streams.producer.events import NewEvent
from runledger.streams.settings import Settings
from tests.integration.conftest import poll, read_log, settings_of
from tests.integration.httpapi.serving import migrated

pytestmark = pytest.mark.timeout(120)


def run(n: int) -> list[NewEvent]:
    """A new stream's first ``n`` events."""
    return [NewEvent("execution.started", {"workflow": "w"}),
            *(NewEvent("step.started", {"step_id": f"s{i}", "name": "n"}) for i in range(n - 1))]


async def test_the_bucket_is_shared_by_replicas_refuses_with_429_and_refills(settings: Settings) -> None:
    """Two replicas' producers take from one bucket, with each append's lease; a refusal appends and takes nothing."""
    async with EventProducer(settings) as one, EventProducer(settings) as two:
        a, b = (Services(settings, p, None, None) for p in (one, two))  # type: ignore[arg-type]
        who = Caller("fleet", "/producers/fleet", ("fleet:",), ("",), rate_per_s=0.5, burst=5)  # a token per 2 s
        streams = (f"fleet:run-{i}" for i in range(100))

        async def append(svc: Services, caller: Caller, n: int) -> None:
            with refused_over_limit(caller, n):
                await svc.producer.append_batch(next(streams), run(n), admission=admission(svc, caller, n))

        await append(a, who, 3)
        await append(b, who, 2)  # the other replica sees the same bucket: 5 taken, none left
        with pytest.raises(Problem) as refused:
            await append(a, who, 1)
        assert refused.value.status == 429 and refused.value.code == "rate_limited"
        assert int(refused.value.headers["Retry-After"]) >= 1
        with pytest.raises(Problem):
            await append(b, who, 1)
        other = Caller("other", "/producers/other", rate_per_s=2.0, burst=5)
        await append(b, other, 5)  # each source its own bucket
        with pytest.raises(Problem) as too_many:
            await append(a, who, 6)  # more than the burst: never
        assert "burst" in too_many.value.detail
        assert len(await read_log(settings)) == 10  # the refused appended nothing

        started = time.monotonic()

        async def refilled() -> bool:
            try:
                await append(a, who, 2)
            except Problem:
                return False
            return True

        await poll(refilled, 15, "two tokens to come back at one per 2 s")
        assert time.monotonic() - started > 1.5, "tokens came back faster than the rate"
        await append(a, Caller("free", "/producers/free"), 30)  # no limit set: always passes
        assert not await one._redis.exists(f"{settings.topic_prefix}:lease:fleet:run-2")  # noqa: SLF001 - given back


async def test_serve_logs_in_as_runledger_api_which_reads_and_writes_nothing_but_webhook_endpoints(
        env: dict[str, str]) -> None:
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
        # Webhooks: the endpoints its callers add and their sealed secrets; nothing of the deliveries.
        await conn.fetch("SELECT * FROM webhook_endpoints LIMIT 1")
        await conn.fetch("SELECT * FROM webhook_secrets LIMIT 1")
        for statement in ("SELECT * FROM webhook_deliveries LIMIT 1", "SELECT body FROM webhook_messages LIMIT 1",
                          "SELECT * FROM webhook_replays LIMIT 1", "UPDATE webhook_messages SET state = 'dead'",
                          "DELETE FROM webhook_endpoints", "UPDATE webhook_endpoints SET url = 'https://x.example'"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()
