"""A real worker process against events that only look like copies or like valid events: an id reused by
another stream with another hash is the dead letter id_conflict, and an event with two members of one name is
invalid_event, whatever their hashes say. Nothing vanishes as a duplicate."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from runledger.projections.postgres.db import migrate
from runledger.schemas.chain import compute_hash
from runledger.streams.worker.retry import dlq_topic
from tests.integration.conftest import poll, read_log, rechain, running_worker, settings_of

DEADLINE_S = 120


@pytest.fixture
async def worker_env(env: dict[str, str]) -> AsyncIterator[tuple[dict[str, str], asyncpg.Connection]]:
    """A schema and group of the test's own (topics are the test's own already), migrated, and an owner
    connection on it."""
    schema = f"ic_{uuid.uuid4().hex[:12]}"
    env = {**env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}"}
    await migrate(settings_of(env).database_url, schema)
    conn = await asyncpg.connect(settings_of(env).database_url, server_settings={"search_path": schema})
    try:
        yield env, conn
    finally:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


async def _send(env: dict[str, str], values: list[tuple[str, bytes]]) -> None:
    settings = settings_of(env)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_idempotence=False)
    await producer.start()
    try:
        for stream, value in values:
            await producer.send_and_wait(settings.events_topic, value, key=stream.encode())
    finally:
        await producer.stop()


async def _settled(conn: asyncpg.Connection, letters: int, projected: int) -> list[asyncpg.Record]:
    async def check() -> list[asyncpg.Record] | None:
        found = await conn.fetch("SELECT * FROM dead_letters ORDER BY id")
        count = await conn.fetchval("SELECT count(*) FROM audit_log")
        return found if (len(found), count) == (letters, projected) else None

    return await poll(check, DEADLINE_S, f"{projected} events projected and {letters} dead letters")


def _relinked(events: list[dict[str, Any]], first: dict[str, Any]) -> list[dict[str, Any]]:
    """``events`` with ``first`` in place of their first event, the rest linked to it again."""
    out = [first]
    for event in events[1:]:
        event = {**event, "prevhash": out[-1]["hash"]}
        event["hash"] = compute_hash(event)
        out.append(event)
    return out


async def test_an_id_reused_by_another_stream_is_an_id_conflict_and_the_first_stays(
        worker_env: tuple[dict[str, str], asyncpg.Connection]) -> None:
    env, conn = worker_env
    tag = uuid.uuid4().hex[:8]
    a, b = f"ida-{tag}", f"idb-{tag}"
    first = rechain(a)[:2]
    taken = first[0]["id"]
    reused = {**rechain(b)[0], "id": taken}
    reused["hash"] = compute_hash(reused)
    second = _relinked(rechain(b)[:2], reused)
    async with running_worker(env) as worker:
        await _send(env, [(a, orjson.dumps(e)) for e in first])
        await _settled(conn, 0, 2)
        # b's first event under a's id, b's second behind it, and a copy of a's first event (a duplicate).
        await _send(env, [(b, orjson.dumps(e)) for e in second] + [(a, orjson.dumps(first[0]))])
        [letter] = await _settled(conn, 1, 2)
        assert (letter["reason"], letter["stream_id"], letter["seq"], str(letter["event_id"])) == (
            "id_conflict", b, 1, taken)
        assert letter["error"] == (f"{b} seq 1: id {taken} is taken by {a} seq 1, projected with hash "
                                   f"{first[0]['hash']}; this event hashes to {reused['hash']}")
        assert bytes(letter["value"]) == orjson.dumps(reused)
        rows = await conn.fetch("SELECT stream_id, seq, hash FROM audit_log WHERE event_id = $1", uuid.UUID(taken))
        assert [tuple(r) for r in rows] == [(a, 1, first[0]["hash"])]  # the first stays, and alone
        assert await conn.fetchval("SELECT last_seq FROM executions WHERE stream_id = $1", a) == 2
        assert await conn.fetchval("SELECT count(*) FROM executions WHERE stream_id = $1", b) == 0
        parked = await conn.fetch("SELECT stream_id, seq FROM parked_events")
        assert [tuple(r) for r in parked] == [(b, 2)]  # behind its stream's letter
        copies = await read_log(settings_of(env), dlq_topic(settings_of(env).topic_prefix))
        assert [dict(r.headers)["runledger.reason"] for r in copies] == [b"id_conflict"]
        assert worker.poll() is None


async def test_an_event_with_two_data_members_is_dead_lettered_as_invalid_event(
        worker_env: tuple[dict[str, str], asyncpg.Connection]) -> None:
    env, conn = worker_env
    stream = f"dm-{uuid.uuid4().hex[:8]}"
    events = rechain(stream)[:3]
    # A parser that keeps the last "data" reads seq 2 as it was hashed; one that keeps the first reads another.
    twice = b'{"data":{"step_id":"s1","name":"another"},' + orjson.dumps(events[1])[1:]
    assert orjson.loads(twice) == events[1]
    other = rechain(f"ok-{stream}")[:2]
    async with running_worker(env) as worker:
        await _send(env, [(stream, orjson.dumps(events[0])), (stream, twice), (stream, orjson.dumps(events[2]))]
                    + [(other[0]["subject"], orjson.dumps(e)) for e in other])
        [letter] = await _settled(conn, 1, 3)
        assert (letter["reason"], letter["error"]) == ("invalid_event", 'data: duplicate member "data"')
        assert (letter["stream_id"], letter["seq"], str(letter["event_id"])) == (stream, 2, events[1]["id"])
        assert bytes(letter["value"]) == twice
        projected = await conn.fetch("SELECT stream_id, seq FROM audit_log ORDER BY stream_id, seq")
        assert [tuple(r) for r in projected] == [(stream, 1), (other[0]["subject"], 1), (other[0]["subject"], 2)]
        parked = await conn.fetch("SELECT stream_id, seq FROM parked_events")
        assert [tuple(r) for r in parked] == [(stream, 3)]  # behind the letter, not retried
        assert worker.poll() is None
