"""A real worker process with failing records: each permanent reason is dead-lettered (topic and table),
a record whose predecessor never comes runs through the retry topics first, and PostgreSQL going away
for 10 s loses nothing."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from runledger.streams.dev.fleet import simulate_fleet
from runledger.streams.producer.client import EventProducer
from runledger.streams.tools.verifylog import verify_log
from runledger.streams.worker.retry import dlq_topic
from tests.integration.conftest import (
    FIRST_STREAM,
    poll,
    read_log,
    rechain,
    rehashed,
    running_worker,
    settings_of,
)
from tests.integration.deadletters.pgproxy import PgProxy

DEADLINE_S = 120


def _bad_records() -> tuple[list[tuple[bytes, bytes]], dict[str, bytes], bytes, int]:
    """(key, value) to send in order, the value dead-lettered per reason, the event that runs out of retries behind
    the hash mismatch, and how many events must project."""
    good = rechain("ok-a")
    hm = rechain("hm")
    tampered = {**hm[0], "data": {**hm[0]["data"], "workflow": "rewritten"}}  # hash no longer matches
    cb = rechain("cb")
    sc = rechain("sc")
    it = rechain("it")
    illegal = rehashed({**FIRST_STREAM[5], "subject": "it", "seq": 3, "prevhash": it[1]["hash"],
                        "data": {"step_id": "never-started"}})
    gap = rechain("gap")
    dead = {
        "invalid_json": b"not json",
        "invalid_event": orjson.dumps({"specversion": "1.0", "subject": "bad-event", "seq": 1,
                                       "type": "execution.started"}),
        "unknown_type": orjson.dumps(rehashed(rechain("unk")[0], type="agent.exploded")),
        "hash_mismatch": orjson.dumps(tampered),
        "chain_broken": orjson.dumps(rehashed(cb[1], prevhash="f" * 64)),
        "seq_conflict": orjson.dumps(rehashed(sc[1], data={"step_id": "s9", "name": "other", "order": 9,
                                                          "input": {}})),
        "illegal_transition": orjson.dumps(illegal),
        "retries_exhausted": orjson.dumps(gap[2]),  # seq 3; seq 2 never comes
    }
    events: list[dict[str, Any]] = [*good, cb[0], sc[0], sc[1], it[0], it[1], gap[0], hm[1], hm[2]]
    sends = [(e["subject"].encode(), orjson.dumps(e)) for e in events]
    # Keyed by stream like any producer's record, so each lands behind its stream's earlier events.
    sends += [(value[value.find(b'"subject":"') + 11:].split(b'"')[0] if value.startswith(b"{") else b"junk", value)
              for value in dead.values()]
    projected = len(good) + 1 + 2 + 2 + 1
    return sends, dead, orjson.dumps(hm[1]), projected


async def test_each_permanent_reason_is_dead_lettered_and_the_worker_goes_on(env: dict[str, str]) -> None:
    schema = f"dl_{uuid.uuid4().hex[:12]}"
    env = {**env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}",
           "RUNLEDGER_RETRY_DELAYS": "0.2,0.4"}
    settings = settings_of(env)
    sends, dead, behind_hm, projected = _bad_records()
    conn = await asyncpg.connect(settings.database_url)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_idempotence=False)
    await producer.start()
    try:
        async with running_worker(env) as worker:
            positions = {}
            for key, value in sends:
                meta = await producer.send_and_wait(settings.events_topic, value, key=key)
                positions[value] = (meta.partition, meta.offset)

            async def settled() -> list[asyncpg.Record] | None:
                try:
                    letters = await conn.fetch(f'SELECT * FROM "{schema}".dead_letters ORDER BY id')
                    count = await conn.fetchval(f'SELECT count(*) FROM "{schema}".audit_log')
                except asyncpg.UndefinedTableError:
                    return None
                # A letter's copy is in the dead-letter topic once the outbox published it, after the commit.
                published = all(r["dlq_offset"] is not None for r in letters)
                done = len(letters) == len(dead) + 1 and count == projected and published
                return letters if done else None

            letters = await poll(settled, DEADLINE_S, "every record projected or dead-lettered, and its copy out")
            by_reason = {r["reason"]: r for r in letters if bytes(r["value"]) in dead.values()}
            assert set(by_reason) == set(dead)
            for reason, value in dead.items():
                letter = by_reason[reason]
                assert bytes(letter["value"]) == value, reason
                assert (letter["topic"], letter["partition"], letter["offset"]) == (
                    settings.events_topic, *positions[value]), reason
                assert letter["dlq_topic"] == dlq_topic(settings.topic_prefix) and letter["dlq_offset"] is not None
            assert by_reason["retries_exhausted"]["attempts"] == 3  # first delivery + two retry topics
            assert (by_reason["retries_exhausted"]["stream_id"], by_reason["retries_exhausted"]["seq"]) == ("gap", 3)
            assert "seq 2 is not projected yet" in by_reason["retries_exhausted"]["error"]
            # A hash that does not verify proves nothing: the stream is only claimed, and not blocked. So hm's
            # seq 2 ran through the retry topics and out of them (its hash verifies: its letter blocks hm), and
            # seq 3 waits behind that letter.
            mismatch = by_reason["hash_mismatch"]
            assert (mismatch["stream_id"], mismatch["claimed_stream_id"], mismatch["seq"]) == (None, "hm", 1)
            [exhausted] = [r for r in letters if bytes(r["value"]) == behind_hm]
            assert (exhausted["reason"], exhausted["stream_id"], exhausted["seq"], exhausted["attempts"]) == (
                "retries_exhausted", "hm", 2, 3)
            parked = await conn.fetch(f'SELECT seq FROM "{schema}".parked_events WHERE stream_id = $1', "hm")
            assert [r["seq"] for r in parked] == [3]

            copies = await read_log(settings, dlq_topic(settings.topic_prefix))
            assert sorted(r.value for r in copies) == sorted([*dead.values(), behind_hm])
            for record in copies:
                headers = {k: v.decode() for k, v in record.headers}
                letter = next(r for r in letters if bytes(r["value"]) == record.value)
                assert headers["runledger.reason"] == letter["reason"]
                assert headers["runledger.error"] == letter["error"]
                assert headers["runledger.dead_letter_id"] == str(letter["id"])
                assert headers["runledger.original.topic"] == settings.events_topic
                assert (int(headers["runledger.original.partition"]), int(headers["runledger.original.offset"])) \
                    == positions[record.value]
                assert int(headers["runledger.attempts"]) == letter["attempts"]
                assert {"runledger.first_failure", "runledger.last_failure"} <= set(headers)

            # Still working: a new stream is projected.
            late = rechain("late")[0]
            await producer.send_and_wait(settings.events_topic, orjson.dumps(late), key=b"late")

            async def late_projected() -> bool:
                return await conn.fetchval(f'SELECT count(*) FROM "{schema}".audit_log WHERE stream_id = $1',
                                           "late") == 1

            await poll(late_projected, DEADLINE_S, "a record after the failures")
            assert worker.poll() is None
    finally:
        await producer.stop()
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


@pytest.mark.slow
async def test_postgres_gone_for_ten_seconds_loses_nothing_and_keeps_seq_order(env: dict[str, str]) -> None:
    schema = f"po_{uuid.uuid4().hex[:12]}"
    settings = settings_of(env)
    proxy = PgProxy("127.0.0.1", settings.port_of("postgres"))
    await proxy.start()
    env = {**env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}",
           "RUNLEDGER_DATABASE_URL": settings.database_url.replace(f":{settings.port_of('postgres')}/",
                                                                   f":{proxy.port}/")}
    fleet = simulate_fleet(60, seed=7, run_tag=schema)
    total = sum(len(run.events) for run in fleet)
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with running_worker(env) as worker:
            async with EventProducer(settings_of(env)) as producer:
                async def count() -> int:
                    try:
                        return await conn.fetchval(f'SELECT count(*) FROM "{schema}".audit_log')
                    except asyncpg.UndefinedTableError:
                        return 0

                async def started() -> bool:
                    return await count() > 0

                # A third of the fleet before the outage, a third during it, a third after.
                third = len(fleet) // 3
                for run in fleet[:third]:
                    await producer.append_batch(run.stream_id, run.events[:len(run.events) // 2])
                await poll(started, DEADLINE_S, "the worker to project something")
                await proxy.stop()
                before = await count()
                outage = asyncio.create_task(asyncio.sleep(10))
                for run in fleet[:third]:
                    await producer.append_batch(run.stream_id, run.events[len(run.events) // 2:])
                for run in fleet[third:2 * third]:
                    await producer.append_batch(run.stream_id, run.events)
                await outage
                assert await count() == before  # really nothing reached PostgreSQL
                await proxy.start()
                for run in fleet[2 * third:]:
                    await producer.append_batch(run.stream_id, run.events)

                async def all_projected() -> bool:
                    return await count() == total

                await poll(all_projected, DEADLINE_S, f"all {total} events projected")
                url = await conn.fetchval(f'SELECT metrics_url FROM "{schema}".workers')
                with urllib.request.urlopen(url, timeout=10) as answer:  # what the outage alert reads
                    lines = answer.read().decode().splitlines()
                forwarded = [float(line.split()[-1]) for line in lines
                             if line.startswith("runledger_batches_forwarded_total ")]
                assert forwarded and forwarded[0] > 0, "the batches forwarded during the outage are not counted"
            assert worker.poll() is None
        rows = await conn.fetch(f'SELECT stream_id, seq, attempts, applied_order FROM "{schema}".audit_log')
        assert len({(r["stream_id"], r["seq"]) for r in rows}) == total  # exactly once
        by_stream: dict[str, list[asyncpg.Record]] = {}
        for r in sorted(rows, key=lambda r: r["applied_order"]):
            by_stream.setdefault(r["stream_id"], []).append(r)
        for stream, applied in by_stream.items():
            assert [r["seq"] for r in applied] == list(range(1, len(applied) + 1)), stream
        assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".dead_letters') == 0
        # The records forwarded whole were read again from the log once PostgreSQL answered: each partition's
        # tree holds every record once, in log order, and every audit row names its leaf (their copies from
        # the retry topics were duplicates by then, or waited for their leaf).
        checked = await verify_log(settings_of({**env, "RUNLEDGER_DATABASE_URL": settings.database_url}))
        assert checked.intact and checked.compared == total, [f.as_dict() for f in checked.findings]
        expected = {("timeout" if run.outcome == "timed_out" else run.outcome) for run in fleet}
        assert {r["status"] for r in await conn.fetch(f'SELECT status FROM "{schema}".executions')} == expected
    finally:
        await proxy.stop()
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
