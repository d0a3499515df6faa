"""Records PostgreSQL refuses, and records it could not store, against a real database: each is dead-lettered
alone, byte for byte, and the rest of its batch is projected. The refusals are real: a trigger in the test's own
schema refuses what a constraint of a real deployment might (SQLSTATE 23514), at once or at commit."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import asyncpg
import orjson

from runledger.projections import planner as planner_module
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.records import LogRecord
from runledger.schemas.events import MAX_EVENT_BYTES
from runledger.streams.kafka import client_options
from runledger.streams.worker.outbox import BatchHandler, Forwarder
from runledger.streams.worker.retry import RetrySchedule
from tests.integration.conftest import FIRST_STREAM, read_log, rechain, rehashed

POISON_MODEL = "poison-model"
REFUSE_POISON = f"""
CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.model = '{POISON_MODEL}' THEN
        RAISE EXCEPTION 'model % is refused here', NEW.model USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_poison BEFORE INSERT ON costs FOR EACH ROW EXECUTE FUNCTION refuse_poison();
"""


def stream(subject: str, *, poison_at: int | None = None) -> list[dict[str, Any]]:
    """The first vector stream as ``subject``; with ``poison_at`` (index of a cost event), a refused model there."""
    events = [dict(e) for e in FIRST_STREAM]
    if poison_at is not None:
        events[poison_at] = {**events[poison_at], "data": {**events[poison_at]["data"], "model": POISON_MODEL}}
    return rechain(subject, events)


def as_records(events: list[dict[str, Any]], *, start: int = 0, attempts: int = 0) -> list[LogRecord]:
    return [LogRecord("t.events", 0, start + i, e["subject"].encode() if isinstance(e.get("subject"), str) else None,
                      orjson.dumps(e), attempts=attempts) for i, e in enumerate(events)]


def interleave(*streams: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i in range(max(len(s) for s in streams)):
        out += [s[i] for s in streams if i < len(s)]
    return out


async def test_a_record_postgres_refuses_is_dead_lettered_alone_and_the_batch_goes_on(
        store: ProjectionStore, owner: asyncpg.Connection) -> None:
    await owner.execute(REFUSE_POISON)
    good = [stream(f"ok-{i}") for i in range(30)]
    poisoned = stream("poisoned", poison_at=2)  # seq 3
    batch = as_records(interleave(*good[:15], poisoned, *good[15:]))
    schedule = RetrySchedule("t", (1.0,))

    result = await store.apply_batch(batch, route=schedule.route)

    letters = await owner.fetch("SELECT * FROM dead_letters")
    assert [(r["reason"], r["stream_id"], r["seq"]) for r in letters] == [("rejected_by_database", "poisoned", 3)]
    assert bytes(letters[0]["value"]) == orjson.dumps(poisoned[2])
    assert "23514" in letters[0]["error"] and "model poison-model is refused here" in letters[0]["error"]
    assert result.rejected == {"rejected_by_database": 1}
    assert result.transactions > 10  # the halves, each rolled back or committed, down to the refused record
    # Every other stream whole; the poisoned one up to its refused event, the rest parked behind the letter.
    heads = {r["stream_id"]: r["seq"] for r in await owner.fetch("SELECT stream_id, seq FROM stream_heads")}
    assert heads == {**{f"ok-{i}": 9 for i in range(30)}, "poisoned": 2}
    assert await owner.fetchval("SELECT count(*) FROM audit_log") == 30 * 9 + 2
    parked = await owner.fetch("SELECT seq FROM parked_events WHERE stream_id = 'poisoned' ORDER BY seq")
    assert [r["seq"] for r in parked] == list(range(4, 10))
    # The letter's copy waits in the outbox, written with it; the refused attempts left nothing behind.
    outbox = await owner.fetch("SELECT * FROM outbox")
    assert [(r["dead_letter_id"], r["topic"]) for r in outbox] == [(letters[0]["id"], "t.events.dlq")]
    assert orjson.loads(outbox[0]["headers"])["runledger.reason"] == "rejected_by_database"
    assert await owner.fetchval("SELECT max(next_offset) FROM consumer_offsets") == len(batch)

    # The same from a retry topic: the record's attempts count on.
    again = stream("retried", poison_at=4)
    assert (await store.apply_batch(as_records(again[:4], start=1000))).transactions == 1
    result = await store.apply_batch(as_records(again[4:5], start=7, attempts=2), route=schedule.route)
    letter = await owner.fetchrow("SELECT * FROM dead_letters WHERE stream_id = 'retried'")
    assert (letter["reason"], letter["seq"], letter["attempts"]) == ("rejected_by_database", 5, 3)


async def test_what_postgres_cannot_store_is_refused_before_it_gets_there(
        store: ProjectionStore, owner: asyncpg.Connection) -> None:
    nul_value = rehashed(rechain("nul")[0], data={"workflow": "w", "input": {"note": "a\u0000b"}})
    nul_key = rehashed(rechain("nul-key")[0], data={"workflow": "w", "input": {"a\u0000": 1}})
    nul_subject = b'{"specversion":"1.0","subject":"bad\\u0000stream","seq":1,"type":"execution.started"}'
    huge = rechain("huge")[0]
    huge = rehashed(huge, data={**huge["data"], "input": {"blob": "x" * (2 * 1024 * 1024)}})
    wide = rechain("wide", FIRST_STREAM[:2])
    wide[1] = {**wide[1], "data": {**wide[1]["data"], "order": 2**31}}
    wide = rechain("wide", wide)
    nested = orjson.dumps({**rechain("deep")[0], "data": {"workflow": "w", "input": "here"}}).replace(
        b'"here"', b'{"a":' * 300 + b"{}" + b"}" * 300)  # deeper than the JSON encoders go
    values = [orjson.dumps(nul_value), orjson.dumps(nul_key), nul_subject, orjson.dumps(huge),
              *(orjson.dumps(e) for e in wide), nested]
    assert len(values[3]) > MAX_EVENT_BYTES
    result = await store.apply_batch([LogRecord("t.events", 0, i, b"k", v) for i, v in enumerate(values)])

    letters = {bytes(r["value"]): r for r in await owner.fetch("SELECT * FROM dead_letters")}
    assert {v: letters[v]["reason"] for v in values[:4]} == {
        values[0]: "invalid_event", values[1]: "invalid_event", values[2]: "invalid_event", values[3]: "too_large"}
    assert "data.input.note" in letters[values[0]]["error"] and "U+0000" in letters[values[0]]["error"]
    assert "U+0000" in letters[values[1]]["error"]
    assert letters[values[2]]["claimed_stream_id"] == "bad\\u0000stream"  # written out: text has no U+0000
    assert "524,288" in letters[values[3]]["error"]
    assert letters[values[-1]]["reason"] == "invalid_event"
    # A step order above 2^31 - 1 is valid (up to 2^53 - 1) and stored.
    assert result.projected == [("wide", 1), ("wide", 2)]
    assert await owner.fetchval("SELECT step_order FROM steps WHERE stream_id = 'wide'") == 2**31


async def test_an_event_parked_behind_an_accepted_one_is_refused_on_its_own(
        store: ProjectionStore, owner: asyncpg.Connection) -> None:
    await owner.execute(REFUSE_POISON)
    events = stream("follow", poison_at=2)
    # Without a route (a rebuild, a replay) seq 3 arrives first and parks; seq 2 lets it follow, and it is refused.
    await store.apply_batch(as_records([events[0], events[2]]))
    assert await owner.fetchval("SELECT count(*) FROM parked_events") == 1
    result = await store.apply_batch(as_records([events[1], *events[3:]], start=10))

    letters = await owner.fetch("SELECT reason, seq FROM dead_letters")
    assert [(r["reason"], r["seq"]) for r in letters] == [("rejected_by_database", 3)]
    assert await owner.fetchval("SELECT seq FROM stream_heads WHERE stream_id = 'follow'") == 2
    parked = [r["seq"] for r in await owner.fetch("SELECT seq FROM parked_events ORDER BY seq")]
    assert parked == list(range(4, 10))  # behind the letter now, not seq 3 itself
    assert ("follow", 2) in result.projected


async def test_a_refusal_at_commit_leaves_no_copy_without_its_letter(
        store: ProjectionStore, owner: asyncpg.Connection, pool: asyncpg.Pool, settings: Any) -> None:
    """A dead letter whose transaction fails at COMMIT (a deferred trigger refuses it) sends no copy; the record
    is then dead-lettered alone, and only that letter's copy reaches the dead-letter topic."""
    await owner.execute("""
        CREATE FUNCTION refuse_hash_mismatch() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.reason = 'hash_mismatch' THEN
                RAISE EXCEPTION 'hash_mismatch letters are refused at commit' USING ERRCODE = 'check_violation';
            END IF;
            RETURN NULL;
        END $$;
        CREATE CONSTRAINT TRIGGER refuse_hash_mismatch AFTER INSERT ON dead_letters
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_hash_mismatch();
    """)
    good = [stream(f"c-{i}") for i in range(4)]
    tampered = stream("tampered")
    tampered[0] = {**tampered[0], "data": {**tampered[0]["data"], "workflow": "rewritten"}}  # hash no longer matches
    schedule = RetrySchedule(settings.topic_prefix, (1.0,))
    forwarder = Forwarder(client_options(settings), schedule, "test")
    await forwarder.start()
    try:
        result = await BatchHandler(store, forwarder, pool).handle(as_records(interleave(*good, tampered[:1])))
    finally:
        await forwarder.stop()
    assert result is not None and result.rejected == {"rejected_by_database": 1}
    letters = await owner.fetch("SELECT * FROM dead_letters")
    assert len(letters) == 1 and "refused at commit" in letters[0]["error"]
    copies = await read_log(settings, forwarder.dlq_topic)
    assert [dict(c.headers)["runledger.dead_letter_id"].decode() for c in copies] == [str(letters[0]["id"])]
    assert copies[0].value == bytes(letters[0]["value"])
    assert (letters[0]["dlq_topic"], letters[0]["dlq_offset"]) == (forwarder.dlq_topic, copies[0].offset)
    assert await owner.fetchval("SELECT count(*) FROM outbox") == 0
    assert await owner.fetchval("SELECT count(*) FROM audit_log") == 4 * 9


async def test_a_dead_letter_too_large_for_the_topic_gets_a_reference_copy(
        store: ProjectionStore, owner: asyncpg.Connection, pool: asyncpg.Pool, settings: Any) -> None:
    huge = rechain(f"big-{uuid.uuid4().hex[:6]}")[0]
    huge = rehashed(huge, data={**huge["data"], "input": {"blob": "y" * (2 * 1024 * 1024)}})
    value, key = orjson.dumps(huge), b"k" * (1024 * 1024)  # a key that large would not fit either
    forwarder = Forwarder(client_options(settings), RetrySchedule(settings.topic_prefix, (1.0,)), "sch")
    await forwarder.start()
    try:
        await BatchHandler(store, forwarder, pool).handle([LogRecord("t.events", 0, 0, key, value)])
    finally:
        await forwarder.stop()
    letter = await owner.fetchrow("SELECT * FROM dead_letters")
    assert (letter["reason"], bytes(letter["value"])) == ("too_large", value)
    [copy] = await read_log(settings, forwarder.dlq_topic)
    assert orjson.loads(copy.value)["dead_letter"] == {
        "schema": "sch", "id": letter["id"], "bytes": len(value),
        "sha256": hashlib.sha256(value).hexdigest()}
    assert copy.key == hashlib.sha256(key).hexdigest().encode() and bytes(letter["key"]) == key
    headers = {k: v.decode() for k, v in copy.headers}
    assert headers["runledger.reason"] == "too_large" and f"dead_letters row {letter['id']}" in \
        headers["runledger.value_omitted"]


async def test_a_record_that_runledgers_own_code_fails_on_is_dead_lettered_alone(
        store: ProjectionStore, owner: asyncpg.Connection, monkeypatch: Any) -> None:
    original = planner_module.apply

    def buggy(state: Any, event: Any, catalog: Any) -> Any:
        if event.subject == "tripwire" and event.type == "step.completed":
            raise KeyError("a bug")
        return original(state, event, catalog)

    monkeypatch.setattr(planner_module, "apply", buggy)
    result = await store.apply_batch(as_records(interleave(stream("fine-1"), stream("tripwire"), stream("fine-2"))))
    letter = await owner.fetchrow("SELECT * FROM dead_letters")
    assert (letter["reason"], letter["stream_id"], letter["seq"]) == ("processing_failed", "tripwire", 6)
    assert "KeyError" in letter["error"] and result.rejected == {"processing_failed": 1}
    heads = {r["stream_id"]: r["seq"] for r in await owner.fetch("SELECT stream_id, seq FROM stream_heads")}
    assert heads == {"fine-1": 9, "fine-2": 9, "tripwire": 5}


async def test_an_event_parked_under_older_rules_leaves_its_stream_as_a_dead_letter(
        store: ProjectionStore, owner: asyncpg.Connection) -> None:
    events = stream("old-parked")
    await store.apply_batch(as_records(events[:1]))
    legacy = rehashed({**events[2], "data": {**events[2]["data"], "model": "nul\u0000model"}})
    await owner.execute("INSERT INTO parked_events (stream_id, seq, event_id, value, kafka_topic, kafka_partition, "
                        "kafka_offset, parked_at) VALUES ('old-parked', 3, $1, $2, 't.events', 0, 99, now())",
                        legacy["id"], orjson.dumps(legacy))
    result = await store.apply_batch(as_records(events[1:2], start=10))
    assert result.projected == [("old-parked", 2)]
    letter = await owner.fetchrow("SELECT reason, seq, value FROM dead_letters")
    assert (letter["reason"], letter["seq"], bytes(letter["value"])) == ("invalid_event", 3, orjson.dumps(legacy))
    assert await owner.fetchval("SELECT count(*) FROM parked_events") == 0
