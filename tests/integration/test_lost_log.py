"""`runledger dev down` empties the embedded broker's in-memory log while PostgreSQL keeps the projections and
their offsets. The next `runledger demo` must not wait in silence: it stops with the cause and the fix, `dev
status` and `wait` say the same, and `runledger offsets reset` gets the projection going again."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import orjson
import pytest

from runledger.projections.postgres.wait import stream_partition
from tests.conftest import CLI, free_ports
from tests.integration.conftest import read_log, settings_of


@pytest.fixture
def own_broker(tmp_path: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The session's PostgreSQL, but a broker and Redis of this test's own, which it may stop."""
    schema = f"lost_{uuid.uuid4().hex[:10]}"
    kafka, redis = free_ports(2)
    env = {**env, "RUNLEDGER_STATE_DIR": str(tmp_path), "RUNLEDGER_EMBEDDED": "kafka,redis",
           "RUNLEDGER_KAFKA_STORAGE": "memory",  # the broker that loses its log at `dev down`
           "RUNLEDGER_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka}", "RUNLEDGER_REDIS_URL": f"redis://127.0.0.1:{redis}/0",
           "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}"}
    yield env
    runledger(env, "dev", "down")


def runledger(env: dict[str, str], *args: str, timeout: float = 200) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.slow
async def test_demo_after_dev_down_names_the_cause_and_the_fix_works(own_broker: dict[str, str]) -> None:
    env = own_broker
    settings = settings_of(env)
    first = runledger(env, "demo", "--executions", "6", "--timeout", "120")
    assert first.returncode == 0, first.stderr[-3000:]
    assert runledger(env, "dev", "down").returncode == 0  # the log is gone; the projections stay

    again = runledger(env, "demo", "--executions", "6", "--timeout", "120")
    assert again.returncode == 3, again.stderr[-3000:]
    assert "recreated or emptied" in again.stderr or "holds another record" in again.stderr, again.stderr[-3000:]
    assert "runledger offsets reset" in again.stderr

    status = runledger(env, "dev", "status")
    assert "STALLED" in status.stdout and "runledger offsets reset" in status.stdout, status.stdout
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": settings.db_schema})
    try:
        held = {r["partition"] for r in await conn.fetch("SELECT partition FROM log_problems")}
    finally:
        await conn.close()
    waiting = next(r for r in await read_log(settings)
                   if stream_partition(r.key.decode(), int(env["RUNLEDGER_EVENT_PARTITIONS"])) in held)
    waited = runledger(env, "wait", waiting.key.decode(), "1", "--timeout", "20")
    assert waited.returncode == 3 and waited.stdout.startswith("stalled:"), waited.stdout + waited.stderr
    assert "runledger offsets reset" in waited.stdout

    check = runledger(env, "offsets", "check")
    assert check.returncode == 1 and ("recreated" in check.stdout or "another record" in check.stdout), check.stdout
    reset = runledger(env, "offsets", "reset", "--yes")
    assert reset.returncode == 0 and "projected again from offset 0" in reset.stdout, reset.stdout + reset.stderr
    assert runledger(env, "offsets", "check").returncode == 0

    third = runledger(env, "demo", "--executions", "6", "--timeout", "120")
    assert third.returncode == 0, third.stderr[-3000:]
    # The second run's events, appended while the partitions were held back, are projected now too.
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": settings.db_schema})
    try:
        log = await read_log(settings)
        assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE event_id = ANY($1::uuid[])",
                                   [orjson.loads(r.value)["id"] for r in log]) == len(log)
    finally:
        await conn.close()


@pytest.mark.slow
def test_a_rebuild_refuses_a_log_that_no_longer_holds_what_was_projected(own_broker: dict[str, str]) -> None:
    env = own_broker
    first = runledger(env, "demo", "--executions", "6", "--timeout", "120")
    assert first.returncode == 0, first.stderr[-3000:]
    kept = runledger(env, "rebuild", "--no-switch", "--json")
    assert kept.returncode == 0 and orjson.loads(kept.stdout)["equal"], kept.stdout + kept.stderr
    assert runledger(env, "dev", "down").returncode == 0  # the log is gone; the projections stay
    assert runledger(env, "dev", "up").returncode == 0
    resumed = runledger(env, "rebuild")  # where the kept rebuild stopped, the log has nothing now
    assert resumed.returncode == 2 and "recreated or emptied" in resumed.stderr, resumed.stdout + resumed.stderr
    assert "--fresh" in resumed.stderr
    fresh = runledger(env, "rebuild", "--fresh")  # from offset 0, up to offsets the log does not reach
    assert fresh.returncode == 2 and "recreated or emptied" in fresh.stderr, fresh.stdout + fresh.stderr
    refilled = runledger(env, "demo", "--executions", "6", "--timeout", "120")  # a new log, as long as the old
    assert refilled.returncode == 3, refilled.stderr[-3000:]
    again = runledger(env, "rebuild", "--fresh")  # would re-project other records than the live tables hold
    assert again.returncode == 2 and "recreated" in again.stderr and "offsets check" in again.stderr, again.stderr
