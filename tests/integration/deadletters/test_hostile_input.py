"""Hostile records against a real worker process: identifiers longer than PostgreSQL can index, record content
that would drive a terminal, a subject forged onto another stream, a leap second. Each is refused or projected as
SPEC.md says, and costs the worker at most twice what as many valid records cost, counted in PostgreSQL
transactions (``runledger_store_transactions_total``, which counts the rolled back ones of a batch isolated by
halves too): the records of each count are in the log before the worker that counts them starts, on one
partition, so each lands in the batches a valid record would."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from runledger.projections.postgres.db import connect, migrate
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.postgres.wait import wait_projected
from runledger.projections.pricing import load_tokencost_catalog
from runledger.projections.records import LogRecord
from runledger.streams.topics import ensure_topics, worker_topics
from tests.conftest import CLI, free_ports
from tests.integration.conftest import poll, read_log, rechain, rehashed, running_worker, settings_of, worker_log
from tests.integration.test_metrics import scrape

DEADLINE_S = 120
Send = tuple[bytes, bytes]  # (key, value) of a record of the log


@pytest.fixture
async def hostile_env(env: dict[str, str]) -> AsyncIterator[tuple[dict[str, str], asyncpg.Connection]]:
    """A schema, group and one-partition topics of the test's own, a metrics port, and an owner connection."""
    schema = f"h_{uuid.uuid4().hex[:12]}"
    (port,) = free_ports(1)
    env = {**env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}",
           "RUNLEDGER_EVENT_PARTITIONS": "1", "RUNLEDGER_METRICS_PORT": str(port)}
    settings = settings_of(env)
    await migrate(settings.database_url, schema)
    await ensure_topics(settings, worker_topics(settings))
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": schema})
    try:
        yield env, conn
    finally:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


async def send(env: dict[str, str], values: list[Send]) -> None:
    settings = settings_of(env)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_idempotence=False,
                                max_request_size=2 * 1024 * 1024)
    await producer.start()
    try:
        for key, value in values:
            await producer.send_and_wait(settings.events_topic, value, key=key)
    finally:
        await producer.stop()


def runledger(env: dict[str, str], *args: str, code: int = 0, stdin: str = "") -> str:
    """What the command line writes, stdout then stderr; it must exit with ``code``."""
    done = subprocess.run([*CLI, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
                          input=stdin)
    assert done.returncode == code, done.stdout + done.stderr
    return done.stdout + done.stderr


def keyed(events: list[dict[str, Any]]) -> list[Send]:
    return [(str(e["subject"]).encode(), orjson.dumps(e)) for e in events]


async def project_in_process(env: dict[str, str], values: list[Send]) -> None:
    """Append ``values`` and project the whole log as a worker would (its offsets and trees too), without one."""
    await send(env, values)
    settings = settings_of(env)
    pool = await connect(settings.database_url, settings.db_schema)
    try:
        store = ProjectionStore(pool, load_tokencost_catalog(), settings.consumer_group)
        await store.apply_batch([LogRecord(r.topic, r.partition, r.offset, r.key, r.value or b"")
                                 for r in await read_log(settings)])
    finally:
        await pool.close()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def metrics_of(worker: Any) -> str:
    async def url() -> str | None:
        found = re.search(r"Prometheus metrics at (http://\S+/metrics)", worker_log(worker))
        return found[1] if found else None

    return await poll(url, DEADLINE_S, "the worker to say where its metrics are")


async def counted(url: str, records: int) -> Samples:
    """The worker's metrics once it has counted ``records`` records read from the log."""
    async def check() -> Samples | None:
        samples = await asyncio.to_thread(scrape, url)
        return samples if samples.get(("runledger_records_consumed_total", (("source", "log"),))) == records else None

    return await poll(check, DEADLINE_S, f"the worker to count {records} records")


def transactions(samples: Samples) -> float:
    return samples[("runledger_store_transactions_total", ())]


async def worker_transactions(env: dict[str, str], values: list[Send], done: Callable[[], Awaitable[bool]]
                              ) -> tuple[float, str]:
    """Append ``values``, then start a worker: the PostgreSQL transactions its batches took to apply them, once
    ``done`` holds, and what it logged."""
    await send(env, values)
    async with running_worker(env) as worker:
        url = await metrics_of(worker)
        await poll(done, DEADLINE_S, "the records applied")
        return transactions(await counted(url, len(values))), worker_log(worker)


def at_most_twice(bad: float, valid: float) -> None:
    assert 0 < valid and bad <= 2 * valid, f"{bad:g} transactions for the bad records, {valid:g} for as many valid"


async def count(conn: asyncpg.Connection, sql: str, *args: Any) -> int:
    return int(await conn.fetchval(sql, *args))


# -- identifiers longer than PostgreSQL can index -----------------------------------------------------------------

N_LONG = 26
# (type, the identifier made too long, data) of each event type that carries an identifier (SPEC.md section 5): on a
# stream whose seq 1 (execution.started) and seq 2 (step.started "s") are projected, except execution.started.
KINDS: list[tuple[str, str, dict[str, Any]]] = [
    ("execution.started", "workflow", {"workflow": "w"}),
    ("execution.started", "agent_id", {"workflow": "w", "agent_id": "a"}),
    ("execution.started", "customer_id", {"workflow": "w", "customer_id": "c"}),
    ("step.started", "step_id", {"step_id": "t", "name": "n"}),
    ("step.retrying", "step_id", {"step_id": "s", "attempt": 1}),
    ("step.completed", "step_id", {"step_id": "s"}),
    ("step.failed", "step_id", {"step_id": "s", "error": {"type": "t", "message": "m"}}),
    ("step.skipped", "step_id", {"step_id": "k"}),
    ("cost.incurred", "provider", {"provider": "openai", "model": "gpt-4o", "input_tokens": 1, "output_tokens": 1}),
    ("cost.incurred", "model", {"provider": "openai", "model": "gpt-4o", "input_tokens": 1, "output_tokens": 1}),
    ("cost.incurred", "step_id", {"provider": "openai", "model": "gpt-4o", "input_tokens": 1, "output_tokens": 1,
                                  "step_id": "s"}),
    ("artifact.created", "artifact_id", {"artifact_id": "a", "type": "log", "name": "n", "uri": "s3://b/a"}),
    ("artifact.created", "step_id", {"artifact_id": "a", "type": "log", "name": "n", "uri": "s3://b/a",
                                     "step_id": "s"}),
]


def _stream_with(subject: str, kind: tuple[str, str, dict[str, Any]], long: bool) -> list[dict[str, Any]]:
    """``kind``'s event, last of a stream (valid but for the identifier made ``long``): its events before it first."""
    type_, field, data = kind
    if long:  # random, so that PostgreSQL cannot compress it under its index limit (about 2.7 KB)
        data = {**data, field: secrets.token_urlsafe(3000)}
    template = {"specversion": "1.0", "source": "/producers/test", "time": "2026-11-22T10:00:00.000Z",
                "datacontenttype": "application/json"}
    events = [] if type_ == "execution.started" else [
        {**template, "type": "execution.started", "data": {"workflow": "w"}},
        {**template, "type": "step.started", "data": {"step_id": "s", "name": "n"}}]
    events.append({**template, "type": type_, "data": data})
    return rechain(subject, [{**e, "seq": seq} for seq, e in enumerate(events, start=1)])


async def test_identifiers_over_200_characters_are_invalid_events_naming_the_field_and_cost_no_bisection(
        hostile_env: tuple[dict[str, str], asyncpg.Connection]) -> None:
    env, conn = hostile_env
    tag = uuid.uuid4().hex[:6]
    kinds = [KINDS[i % len(KINDS)] for i in range(N_LONG)]
    valid = [_stream_with(f"ok-{tag}-{i}", kind, long=False) for i, kind in enumerate(kinds)]
    long = [_stream_with(f"long-{tag}-{i}", kind, long=True) for i, kind in enumerate(kinds)]
    # What comes before each measured event is projected first, without a worker.
    await project_in_process(env, keyed([e for s in valid + long for e in s[:-1]]))
    before = await count(conn, "SELECT count(*) FROM audit_log")

    async def all_projected() -> bool:
        return await count(conn, "SELECT count(*) FROM audit_log") == before + N_LONG

    valid_cost, _ = await worker_transactions(env, keyed([s[-1] for s in valid]), all_projected)

    async def all_applied() -> bool:
        return await count(conn, "SELECT (SELECT count(*) FROM dead_letters) + (SELECT count(*) FROM audit_log)"
                           ) == before + 2 * N_LONG

    long_cost, _ = await worker_transactions(env, keyed([s[-1] for s in long]), all_applied)
    at_most_twice(long_cost, valid_cost)
    letters = {r["stream_id"]: r for r in await conn.fetch("SELECT * FROM dead_letters")}
    for stream, (_, field, _) in zip(long, kinds, strict=True):
        letter = letters[stream[-1]["subject"]]
        assert (letter["reason"], letter["error"], letter["seq"]) == (
            "invalid_event", f"data.{field}: must be 1 to 200 characters (SPEC.md section 4)", len(stream)), field
    assert await count(conn, "SELECT count(*) FROM audit_log") == before + N_LONG  # none of them


# -- a subject forged onto another stream -------------------------------------------------------------------------

N_FORGED = 24


def _forgeries(victim: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records that name the victim's stream, and its next seq, without proving it: their hashes do not verify."""
    real = victim[1]
    kinds = [
        {**real, "data": {**real["data"], "name": "forged"}},  # the real event's id and hash, another content
        {**real, "hash": "0" * 64},
        {**real, "data": {"step_id": "x" * 300, "name": "n"}},  # invalid data, and a hash that does not verify
        {"subject": real["subject"], "seq": 2, "type": "step.started"},  # not an event at all
    ]
    return [{**kinds[i % len(kinds)], "id": real["id"] if i % len(kinds) == 0 else str(uuid.uuid4())}
            for i in range(N_FORGED)]


async def test_records_that_do_not_prove_their_subject_never_block_the_stream_they_name(
        hostile_env: tuple[dict[str, str], asyncpg.Connection]) -> None:
    env, conn = hostile_env
    settings = settings_of(env)
    tag = uuid.uuid4().hex[:6]
    victim = rechain(f"victim-{tag}")
    subject = victim[0]["subject"]
    await project_in_process(env, keyed(victim[:1]))
    others = [rechain(f"other-{tag}-{i}")[0] for i in range(N_FORGED)]

    async def others_projected() -> bool:
        return await count(conn, "SELECT count(*) FROM audit_log") == 1 + N_FORGED

    valid_cost, _ = await worker_transactions(env, keyed(others), others_projected)

    await send(env, [(subject.encode(), orjson.dumps(f)) for f in _forgeries(victim)])
    async with running_worker(env) as worker:
        url = await metrics_of(worker)

        async def all_dead() -> bool:
            return await count(conn, "SELECT count(*) FROM dead_letters") == N_FORGED

        await poll(all_dead, DEADLINE_S, "every forgery dead-lettered")
        at_most_twice(transactions(await counted(url, N_FORGED)), valid_cost)
        # Not the victim's seq 2: `wait` does not take them for it.
        waited = await wait_projected(settings.database_url, settings.db_schema, subject, 2, timeout=0.5)
        assert (waited.status, waited.error) == ("timeout", "not projected yet: the stream is projected up to seq 1")

        # The victim's seq 3 before its seq 2: not parked behind the forgeries (they prove no stream), it follows
        # seq 2 through the retry topics as if they were not there.
        await send(env, keyed(victim[2:3]))

        async def retried() -> bool:
            parked = await count(conn, "SELECT count(*) FROM parked_events")
            assert parked == 0, "seq 3 parked behind letters that do not belong to its stream"
            samples = await asyncio.to_thread(scrape, url)
            return samples[("runledger_events_retried_total", (("delay", "1s"),))] == 1

        await poll(retried, DEADLINE_S, "the victim's seq 3 sent to the retry topic")
        await send(env, keyed(victim[1:2]))

        async def caught_up() -> bool:
            return await count(conn, "SELECT count(*) FROM audit_log WHERE stream_id = $1", subject) == 3

        await poll(caught_up, DEADLINE_S, "the victim's seq 2, then its seq 3 from the retry topic")
        assert worker.poll() is None
    # Nothing lost: kept, and listed by the stream they claim, apart from the stream they would have blocked.
    letters = await conn.fetch("SELECT stream_id, claimed_stream_id, reason, status FROM dead_letters")
    assert {(r["stream_id"], r["claimed_stream_id"], r["status"]) for r in letters} == {(None, subject, "dead")}
    assert len(letters) == N_FORGED and {r["reason"] for r in letters} == {"hash_mismatch", "invalid_event"}
    listed = await asyncio.to_thread(runledger, env, "dlq", "list", "--stream", subject, "--json")
    assert [(x["stream"], x["claimed_stream"]) for x in map(orjson.loads, listed.splitlines())] == [
        (None, subject)] * N_FORGED


# -- what would drive the operator's terminal -----------------------------------------------------------------------

N_ESCAPES = 24
# A window title, a cleared screen, a CSI in its one-byte C1 form, a right-to-left override, a log line of its own.
ESCAPES = "\x1b]0;owned\x07\x1b[2J\x9b31m\u202e\nWARNING forged"
WRITTEN_OUT = "\\u001b]0;owned\\u0007\\u001b[2J\\u009b31m\\u202e\\u000aWARNING forged"


def raw_escapes(text: str) -> list[str]:
    """The pieces of ``ESCAPES`` found raw in ``text`` (a tool's own output may hold other control characters)."""
    return [piece for piece in ("]0;owned\x07", "\x1b[2J", "\x9b31m", "\u202e", "\nWARNING forged") if piece in text]


def _duplicated(event: dict[str, Any], member: str) -> bytes:
    """``event`` (its data ending with ``member``: 2) with ``member`` twice in its data, its hash right for the last."""
    name = orjson.dumps(member)
    return orjson.dumps(event).replace(name + b":2", name + b":1," + name + b":2")


def _with_escapes(tag: str, i: int) -> Send:
    """A record that carries ``ESCAPES``: a valid event with them in its data; an event with two members named by
    them (invalid though its hash verifies: the error names the member); a record claiming a stream id of them."""
    started = rechain(f"esc-{tag}-{i}")[0]
    key = started["subject"].encode()
    if i % 3 == 0:
        return key, orjson.dumps(rehashed(started, data={"workflow": f"w{ESCAPES}", "input": {"note": ESCAPES}}))
    if i % 3 == 1:
        return key, _duplicated(rehashed(started, data={"workflow": "w", ESCAPES: 2}), ESCAPES)
    return ESCAPES.encode(), orjson.dumps({**started, "subject": f"victim{ESCAPES}"})


async def test_what_a_record_holds_reaches_no_terminal_and_forges_no_log_line(
        hostile_env: tuple[dict[str, str], asyncpg.Connection]) -> None:
    env, conn = hostile_env
    tag = uuid.uuid4().hex[:6]

    async def applied(records: int) -> bool:
        return await count(conn, "SELECT (SELECT count(*) FROM dead_letters) + (SELECT count(*) FROM audit_log)"
                           ) == records

    plain = [rechain(f"plain-{tag}-{i}")[0] for i in range(N_ESCAPES)]
    valid_cost, _ = await worker_transactions(env, keyed(plain), lambda: applied(N_ESCAPES))
    cost, log = await worker_transactions(env, [_with_escapes(tag, i) for i in range(N_ESCAPES)],
                                          lambda: applied(2 * N_ESCAPES))
    at_most_twice(cost, valid_cost)
    assert await count(conn, "SELECT count(*) FROM audit_log WHERE stream_id LIKE 'esc-%'") == N_ESCAPES // 3

    # The worker's log: a line per letter, what the record holds written out in it.
    assert not raw_escapes(log) and log.count(WRITTEN_OUT) == 2 * N_ESCAPES // 3, log[-3000:]
    # What an operator runs: the tools' output, and their errors.
    twice = f"esc-{tag}-1"
    line = _duplicated({"stream": "s", "type": "execution.started", "data": {"workflow": "w", ESCAPES: 2}}, ESCAPES)
    outputs = {
        "wait": runledger(env, "wait", twice, "1", "--timeout", "5", code=1),
        "dlq list": runledger(env, "dlq", "list"),
        "dlq list --json": runledger(env, "dlq", "list", "--json"),
        "dlq replay": runledger(env, "dlq", "replay", "--yes", "--stream", twice, code=1),
        "verify log": runledger(env, "verify", "log", "--no-database", code=1),
        "produce": runledger(env, "produce", code=2, stdin=line.decode()),
    }
    for what, text in outputs.items():
        assert not raw_escapes(text), (what, text[-3000:])
        assert "\\u001b]0;owned\\u0007" in text, (what, text[-3000:])


# -- a leap second -------------------------------------------------------------------------------------------------

N_LEAP = 24
LEAP_SECONDS = ["2016-12-31T23:59:60Z", "2016-12-31T23:59:60.250Z", "2016-12-31T23:59:60.999+00:00"]


async def test_a_leap_second_is_projected_as_the_minutes_last_microsecond(
        hostile_env: tuple[dict[str, str], asyncpg.Connection]) -> None:
    env, conn = hostile_env
    tag = uuid.uuid4().hex[:6]

    def started(stream: str, time: str) -> dict[str, Any]:
        return rechain(stream, [{**rechain(stream)[0], "time": time}])[0]

    async def applied(records: int) -> bool:
        return await count(conn, "SELECT (SELECT count(*) FROM dead_letters) + (SELECT count(*) FROM audit_log)"
                           ) == records

    plain = [started(f"plain-{tag}-{i}", "2016-12-31T23:59:59Z") for i in range(N_LEAP)]
    valid_cost, _ = await worker_transactions(env, keyed(plain), lambda: applied(N_LEAP))
    leap = [started(f"leap-{tag}-{i}", LEAP_SECONDS[i % len(LEAP_SECONDS)]) for i in range(N_LEAP)]
    leap_cost, _ = await worker_transactions(env, keyed(leap), lambda: applied(2 * N_LEAP))
    at_most_twice(leap_cost, valid_cost)

    assert await count(conn, "SELECT count(*) FROM dead_letters") == 0
    rows = await conn.fetch("SELECT e.started_at, a.time FROM executions e JOIN audit_log a USING (stream_id) "
                            "WHERE stream_id LIKE 'leap-%'")
    assert len(rows) == N_LEAP
    assert {(r["started_at"].isoformat(), r["time"].isoformat()) for r in rows} == {
        ("2016-12-31T23:59:59.999999+00:00", "2016-12-31T23:59:59.999999+00:00")}
