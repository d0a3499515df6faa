"""`runledger dlq`: a bug dead-letters events, the fix is deployed, the letters are replayed.

The "bug" is a projection rule that wrongly refuses ``step.completed``; the
records go through the real forwarder (Kafka) and store (PostgreSQL) in this
process, then the fixed code (the `runledger` command, in a process of its
own) lists, inspects, dry-runs, replays and resolves them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as redis
from aiokafka import AIOKafkaProducer

from runledger.projections import planner as planner_module
from runledger.projections.postgres.checksum import table_checksums
from runledger.projections.postgres.db import connect, migrate
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.pricing import load_tokencost_catalog
from runledger.projections.records import LogRecord
from runledger.schemas.errors import IllegalTransition
from runledger.streams.kafka import client_options
from runledger.streams.settings import Settings
from runledger.streams.tools.replay import replay
from runledger.streams.worker.outbox import BatchHandler, Forwarder
from runledger.streams.worker.retry import RetrySchedule, dlq_topic
from tests.conftest import CLI
from tests.integration.conftest import read_log, rechain

STATE_TABLES = ("executions", "steps", "costs", "artifacts", "audit_log", "stream_heads")


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[tuple[Settings, asyncpg.Connection]]:
    schema = f"rp_{uuid.uuid4().hex[:12]}"
    settings = settings.model_copy(update={"db_schema": schema, "consumer_group": f"g-{schema}"})
    await migrate(settings.database_url, schema)
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": schema})
    yield settings, conn
    await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    await conn.close()


async def _dead_letter_by_bug(settings: Settings, streams: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Append the streams and project them with a rule that wrongly refuses ``step.completed``."""
    original = planner_module.apply

    def buggy(state: Any, event: Any, catalog: Any) -> Any:
        if event.type == "step.completed":
            raise IllegalTransition(f"step.completed at seq {event.seq}: a bug refuses it")
        return original(state, event, catalog)

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_idempotence=False)
    await producer.start()
    try:
        for stream in streams:
            for event in rechain(stream):
                await producer.send_and_wait(settings.events_topic, orjson.dumps(event), key=stream.encode())
    finally:
        await producer.stop()
    log = await read_log(settings)
    records = [LogRecord(m.topic, m.partition, m.offset, m.key, m.value) for m in log]
    schedule = RetrySchedule(settings.topic_prefix, settings.retry_delays)
    pool = await connect(settings.database_dsn("worker"), settings.db_schema)
    forwarder = Forwarder(client_options(settings), schedule, settings.db_schema)
    await forwarder.start()
    try:
        store = ProjectionStore(pool, load_tokencost_catalog(), settings.consumer_group,
                                max_attempts=schedule.max_attempts)
        await ProjectionStore.save_catalog(pool, store.catalog)
        monkeypatch.setattr(planner_module, "apply", buggy)
        result = await BatchHandler(store, forwarder, pool).handle(records)
        monkeypatch.setattr(planner_module, "apply", original)
    finally:
        await forwarder.stop()
        await pool.close()
    assert result is not None and result.rejected == {"illegal_transition": len(streams)}


async def runledger(settings: Settings, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "RUNLEDGER_TOPIC_PREFIX": settings.topic_prefix, "RUNLEDGER_DB_SCHEMA": settings.db_schema,
           "RUNLEDGER_CONSUMER_GROUP": settings.consumer_group}
    done = await asyncio.to_thread(subprocess.run, [*CLI, *args], env=env,
                                   capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return done.returncode, done.stdout, done.stderr


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


async def test_a_fixed_bug_is_replayed_and_parked_events_follow(db: tuple[Settings, asyncpg.Connection],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    settings, conn = db
    await _dead_letter_by_bug(settings, ["bug-a", "bug-b"], monkeypatch)
    assert await conn.fetchval("SELECT count(*) FROM parked_events") == 6  # seq 7..9 of each wait behind seq 6
    letters = await conn.fetch("SELECT * FROM dead_letters ORDER BY stream_id")
    assert [(r["stream_id"], r["seq"], r["event_type"], r["status"]) for r in letters] == [
        ("bug-a", 6, "step.completed", "dead"), ("bug-b", 6, "step.completed", "dead")]
    dlq = dlq_topic(settings.topic_prefix)
    assert len(await read_log(settings, dlq)) == 2

    # list, show
    code, out, _ = await runledger(settings, "dlq", "list", "--json")
    listed = json_lines(out)
    assert code == 0 and [(x["stream"], x["seq"], x["reason"]) for x in listed] == [
        ("bug-a", 6, "illegal_transition"), ("bug-b", 6, "illegal_transition")]
    assert {"topic", "partition", "offset", "key", "payload", "headers", "ts"} <= set(listed[0])
    assert listed[0]["headers"]["runledger.reason"] == "illegal_transition"
    code, out, _ = await runledger(settings, "dlq", "list", "--reason", "illegal_transition", "--since", "1h")
    assert code == 0 and "bug-a" in out and "2 dead letters of 2 streams: illegal_transition 2" in out
    code, out, _ = await runledger(settings, "dlq", "list", "--until", "1h", "--json")
    assert code == 0 and out == ""
    code, out, _ = await runledger(settings, "dlq", "show", str(listed[0]["id"]), "--json")
    shown = orjson.loads(out)
    assert shown["event"]["type"] == "step.completed" and shown["parked_behind"] == [7, 8, 9]

    # --dry-run: shows what would happen, keeps and sends nothing.
    before = await table_checksums(conn, settings.db_schema)
    dlq_before, log_before = len(await read_log(settings, dlq)), len(await read_log(settings))
    code, out, err = await runledger(settings, "dlq", "replay", "--dry-run", "--json")
    assert code == 0, err
    items = [x for x in json_lines(out) if "outcome" in x]
    assert [(x["stream"], x["outcome"], x["detail"]) for x in items] == [
        ("bug-a", "projected", "parked seq 7..9 followed"), ("bug-b", "projected", "parked seq 7..9 followed")]
    assert items[0]["rows"] == {"executions": 1, "stream_heads": 1, "steps": 2, "audit_log": 4, "artifacts": 1,
                                "parked_events": -3}
    assert await table_checksums(conn, settings.db_schema) == before
    assert await conn.fetchval("SELECT count(*) FROM dead_letters WHERE status = 'dead'") == 2
    assert await conn.fetchval("SELECT count(*) FROM parked_events") == 6
    assert await conn.fetchval("SELECT count(*) FROM dlq_replays") == 0
    assert (len(await read_log(settings, dlq)), len(await read_log(settings))) == (dlq_before, log_before)

    # The replay: projected, and the parked events follow in seq order.
    code, out, err = await runledger(settings, "dlq", "replay", "--yes", "--json")
    assert code == 0, err
    *items, summary = json_lines(out)
    assert [x["outcome"] for x in items] == ["projected", "projected"]
    assert summary["outcomes"] == {"projected": 2} and summary["replay"] is not None
    rows = await conn.fetch("SELECT stream_id, seq FROM audit_log ORDER BY applied_order")
    for stream in ("bug-a", "bug-b"):
        assert [r["seq"] for r in rows if r["stream_id"] == stream] == list(range(1, 10))
    assert {r["status"] for r in await conn.fetch("SELECT status FROM executions")} == {"completed"}
    assert await conn.fetchval("SELECT count(*) FROM parked_events") == 0
    assert {r["status"] for r in await conn.fetch("SELECT status FROM dead_letters")} == {"replayed"}
    recorded = await conn.fetchrow("SELECT * FROM dlq_replays")
    assert (recorded["status"], recorded["selected"], recorded["run_by"] != "") == ("done", 2, True)
    assert await conn.fetchval("SELECT count(*) FROM dlq_replay_items WHERE outcome = 'projected'") == 2

    # The same replay again changes nothing: by the command, and with the letters selected before.
    after = await table_checksums(conn, settings.db_schema)
    code, out, err = await runledger(settings, "dlq", "replay", "--yes")
    assert code == 0 and "nothing to replay" in err
    again = await replay(settings, letters, {})
    assert again.outcomes == {"skipped": 2}
    assert await table_checksums(conn, settings.db_schema) == after
    code, out, _ = await runledger(settings, "dlq", "history", "--json")
    history = json_lines(out)
    assert [h["status"] for h in history] == ["done", "done"]
    assert history[-1]["filter"] == {"statuses": ["dead"]} and history[-1]["outcomes"] == {"projected": 2}


async def test_an_interrupted_replay_resumes_and_a_held_lock_refuses(db: tuple[Settings, asyncpg.Connection],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    settings, conn = db
    streams = [f"bug-{i}" for i in range(5)]
    await _dead_letter_by_bug(settings, streams, monkeypatch)

    # Another replay holds the lock: refused, nothing done.
    client = redis.from_url(settings.redis_url)
    key = f"{settings.topic_prefix}:dlq:replay:{settings.db_schema}"
    await client.set(key, "someone else", px=10_000)
    code, _, err = await runledger(settings, "dlq", "replay", "--yes")
    assert code == 3 and "another replay" in err
    await client.delete(key)
    await client.aclose()

    env = {**os.environ, "RUNLEDGER_TOPIC_PREFIX": settings.topic_prefix, "RUNLEDGER_DB_SCHEMA": settings.db_schema}
    child = await asyncio.create_subprocess_exec(
        *CLI, "dlq", "replay", "--yes", "--json", "--rate", "2", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert child.stdout is not None
    first = orjson.loads(await asyncio.wait_for(child.stdout.readline(), 60))
    assert first["outcome"] == "projected"
    child.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 130, err
    assert b"run the same command again to resume" in err
    assert await conn.fetchval("SELECT status FROM dlq_replays") == "interrupted"
    replayed = await conn.fetchval("SELECT count(*) FROM dead_letters WHERE status = 'replayed'")
    assert 1 <= replayed < len(streams)

    code, out, err = await runledger(settings, "dlq", "replay", "--yes", "--json")
    assert code == 0, err
    assert json_lines(out)[-1]["outcomes"] == {"projected": len(streams) - replayed}
    assert await conn.fetchval("SELECT count(*) FROM dlq_replay_items WHERE outcome = 'projected'") == len(streams)
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == 9 * len(streams)


async def test_resolve_keeps_the_letter_and_needs_a_selection(db: tuple[Settings, asyncpg.Connection],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    settings, conn = db
    await _dead_letter_by_bug(settings, ["bug-r", "bug-s"], monkeypatch)
    code, _, err = await runledger(settings, "dlq", "resolve", "--note", "x", "--yes")
    assert code == 2 and "refused" in err
    code, out, err = await runledger(settings, "dlq", "resolve", "--stream", "bug-r", "--note", "known bug, fixed "
                                     "by hand", "--yes", "--json")
    assert code == 0, err
    letter = await conn.fetchrow("SELECT * FROM dead_letters WHERE stream_id = 'bug-r'")
    assert orjson.loads(out) == {"resolved": [letter["id"]]}
    assert (letter["status"], letter["note"]) == ("resolved", "known bug, fixed by hand")
    code, out, _ = await runledger(settings, "dlq", "list", "--json")  # open letters only, by default
    assert [x["stream"] for x in json_lines(out)] == ["bug-s"]
    code, out, _ = await runledger(settings, "dlq", "list", "--status", "all", "--summary", "--json")
    assert orjson.loads(out) == {"total": 2, "by_reason": {"illegal_transition": 2}}
    code, _, err = await runledger(settings, "dlq", "list", "--since", "yesterday")
    assert code == 2 and "--since: 'yesterday' is neither a duration" in err


async def test_a_letter_cannot_drive_the_operators_terminal(db: tuple[Settings, asyncpg.Connection]) -> None:
    settings, conn = db
    pool = await connect(settings.database_dsn("worker"), settings.db_schema)
    try:
        store = ProjectionStore(pool, load_tokencost_catalog(), settings.consumer_group)
        hostile = b'{"subject": "\\u001b]0;owned\\u0007\\u001b[2J", "seq": 1, "type": "\\u001b[31mred"}'
        result = await store.apply_batch([LogRecord(settings.events_topic, 0, 0, b"k", hostile)])
        assert len(result.dead) == 1
    finally:
        await pool.close()
    letter = await conn.fetchval("SELECT id FROM dead_letters")
    for args in (("dlq", "list"), ("dlq", "show", str(letter))):
        code, out, _ = await runledger(settings, *args)
        assert code == 0 and "\x1b" not in out and "\x07" not in out, out
        assert "\\u001b]0;owned\\u0007" in out  # written out, not lost
