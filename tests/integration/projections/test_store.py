"""Applying batches of log records to real PostgreSQL tables."""

from __future__ import annotations

import random
from decimal import Decimal

import asyncpg
import orjson
import pytest

from runledger.projections.postgres.checksum import table_checksums
from runledger.projections.postgres.db import migrate
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.records import LogRecord
from runledger.schemas.chain import GENESIS_HASH, compute_hash
from runledger.streams.settings import Settings
from tests.conftest import VECTOR_EVENTS

VECTOR_VALUES = [orjson.dumps(event) for event in VECTOR_EVENTS]


def records(values: list[bytes], start: int = 0, partition: int = 0) -> list[LogRecord]:
    return [LogRecord("t.events", partition, start + i, orjson.loads(v).get("subject", "").encode()
                      if v.startswith(b"{") else None, v) for i, v in enumerate(values)]


async def test_the_vectors_project_to_the_expected_rows(store: ProjectionStore, owner: asyncpg.Connection) -> None:
    result = await store.apply_batch(records(VECTOR_VALUES))
    assert len(result.projected) == 18 and not result.rejected and result.duplicates == result.parked == 0
    rows = {r["stream_id"]: r for r in await owner.fetch("SELECT * FROM executions")}
    first = rows["exec-2026-11-22-0001"]
    assert (first["status"], first["workflow"], first["cost_usd"], first["budget_usd"]) == (
        "completed", "invoice-triage", Decimal("0.013800000000"), Decimal("2.50"))
    assert (first["steps_total"], first["steps_completed"], first["steps_skipped"], first["duration_ms"]) == (
        2, 1, 1, 8000)
    assert (first["input_tokens"], first["output_tokens"], first["last_seq"]) == (2400, 580, 9)
    assert {s: r["status"] for s, r in rows.items()} == {
        "exec-2026-11-22-0001": "completed", "exec-2026-11-22-0002": "failed",
        "tenant:eu.exec_0003": "cancelled", "exec-2026-11-22-0004": "timeout"}
    costs = await owner.fetch("SELECT model, cost_usd, cost_source, catalog_version FROM costs ORDER BY stream_id, seq")
    assert [(c["model"], c["cost_usd"], c["cost_source"]) for c in costs] == [
        ("gpt-4o", Decimal("0.006000"), "event"),
        ("claude-3-5-sonnet-20241022", Decimal("0.007800000000"), "catalog"),
        ("mistral-large-latest", Decimal("0.000000000001"), "event"),
    ]
    assert costs[1]["catalog_version"] == store.catalog.version
    step = await owner.fetchrow("SELECT * FROM steps WHERE stream_id = 'exec-2026-11-22-0001' AND step_id = 's1'")
    assert (step["status"], step["attempts"], step["cost_usd"]) == ("completed", 1, Decimal("0.013800000000"))
    assert await owner.fetchval("SELECT count(*) FROM audit_log") == 18
    audit = await owner.fetchrow("SELECT * FROM audit_log WHERE seq = 1 AND stream_id = 'tenant:eu.exec_0003'")
    event = await owner.fetchval("SELECT event FROM audit_events WHERE seq = 1 AND stream_id = 'tenant:eu.exec_0003'")
    assert "data" not in audit and orjson.loads(event)["data"]["workflow"] == "übersetzung"
    assert bytes(audit["raw"]) == VECTOR_VALUES[13] and compute_hash(orjson.loads(audit["raw"])) == audit["hash"]
    assert (audit["kafka_topic"], audit["kafka_offset"]) == ("t.events", 13)
    assert await owner.fetchval("SELECT sum(next_offset) FROM consumer_offsets") == 18


async def test_twice_or_shuffled_across_streams_gives_the_same_tables(
        settings: Settings, store: ProjectionStore, owner: asyncpg.Connection, schema: str) -> None:
    await store.apply_batch(records(VECTOR_VALUES))
    once = await table_checksums(owner, schema)
    await store.apply_batch(records(VECTOR_VALUES, start=100))
    await store.apply_batch(records(VECTOR_VALUES[:5], start=200))
    assert await table_checksums(owner, schema) == once
    # Shuffled across streams (each stream's own order kept), in small batches, on another schema.
    rng = random.Random(5)
    queues = {}
    for value in VECTOR_VALUES:
        queues.setdefault(orjson.loads(value)["subject"], []).append(value)
    shuffled = []
    while queues:
        stream = rng.choice(sorted(queues))
        shuffled.append(queues[stream].pop(0))
        if not queues[stream]:
            del queues[stream]
    assert shuffled != VECTOR_VALUES
    other = schema + "_b"
    await migrate(settings.database_url, other)
    from runledger.projections.postgres.db import connect
    pool = await connect(settings.database_dsn("worker"), other)
    try:
        store_b = ProjectionStore(pool, store.catalog, "g")
        for i in range(0, len(shuffled), 4):
            await store_b.apply_batch(records(shuffled[i:i + 4], start=i))
        assert await table_checksums(owner, other) == once
    finally:
        await pool.close()
        await owner.execute(f'DROP SCHEMA "{other}" CASCADE')


async def test_an_event_ahead_of_its_predecessor_waits_for_it(store: ProjectionStore,
                                                              owner: asyncpg.Connection) -> None:
    first_stream = VECTOR_VALUES[:9]
    result = await store.apply_batch(records([first_stream[0], first_stream[3], first_stream[2]]))
    assert (len(result.projected), result.parked) == (1, 2)
    assert await owner.fetchval("SELECT last_seq FROM executions") == 1
    result = await store.apply_batch(records(first_stream[1:2], start=10))
    assert sorted(result.projected) == [("exec-2026-11-22-0001", 2), ("exec-2026-11-22-0001", 3),
                                        ("exec-2026-11-22-0001", 4)]
    assert await owner.fetchval("SELECT count(*) FROM parked_events") == 0
    assert await owner.fetchval("SELECT last_seq FROM executions") == 4


async def test_malformed_records_are_kept_and_the_rest_is_applied(store: ProjectionStore,
                                                                  owner: asyncpg.Connection) -> None:
    tampered = orjson.loads(VECTOR_VALUES[1])
    tampered["data"]["name"] = "rewritten"
    unknown = {**orjson.loads(VECTOR_VALUES[9]), "type": "agent.exploded"}
    unknown["hash"] = compute_hash(unknown)
    forked = {**orjson.loads(VECTOR_VALUES[10]), "prevhash": GENESIS_HASH}
    forked["hash"] = compute_hash(forked)
    batch = [VECTOR_VALUES[0], b"not json at all", orjson.dumps(tampered), orjson.dumps(unknown),
             VECTOR_VALUES[13], VECTOR_VALUES[14], orjson.dumps(forked)]
    result = await store.apply_batch(records(batch))
    assert result.rejected == {"invalid_json": 1, "hash_mismatch": 1, "unknown_type": 1}
    assert sorted(result.projected) == [("exec-2026-11-22-0001", 1), ("tenant:eu.exec_0003", 1),
                                        ("tenant:eu.exec_0003", 2)]
    kept = await owner.fetch('SELECT reason, value FROM dead_letters ORDER BY "offset"')
    assert [(r["reason"], bytes(r["value"])) for r in kept] == [
        ("invalid_json", b"not json at all"), ("hash_mismatch", batch[2]), ("unknown_type", batch[3])]
    # The forked event of stream 0002 has no projected predecessor: it waits (parked), not dropped.
    assert result.parked == 1
    # Applying the same batch again changes nothing.
    again = await store.apply_batch(records(batch))
    assert again.projected == [] and await owner.fetchval("SELECT count(*) FROM dead_letters") == 3


async def test_a_conflicting_seq_and_a_broken_link_are_rejected(store: ProjectionStore,
                                                                owner: asyncpg.Connection) -> None:
    await store.apply_batch(records(VECTOR_VALUES[:2]))
    conflict = {**orjson.loads(VECTOR_VALUES[1]), "id": "00000000-0000-4000-8000-0000000000ff",
                "data": {"step_id": "s9", "name": "other"}}
    conflict["hash"] = compute_hash(conflict)
    broken = {**orjson.loads(VECTOR_VALUES[2]), "prevhash": "f" * 64}
    broken["hash"] = compute_hash(broken)
    illegal = {**orjson.loads(VECTOR_VALUES[5]), "seq": 3, "prevhash": orjson.loads(VECTOR_VALUES[1])["hash"],
               "data": {"step_id": "never-started"}}
    illegal["hash"] = compute_hash(illegal)
    result = await store.apply_batch(records([orjson.dumps(conflict), orjson.dumps(broken)], start=10))
    assert result.rejected == {"seq_conflict": 1, "chain_broken": 1}
    result = await store.apply_batch(records([orjson.dumps(illegal)], start=20))
    assert result.rejected == {"illegal_transition": 1}
    assert await owner.fetchval("SELECT last_seq FROM executions") == 2


def _chained(subject: str, ids: list[str]) -> list[bytes]:
    """The first vector stream's first events as stream ``subject``, with ``ids``, chained and hashed."""
    out, prev = [], GENESIS_HASH
    for value, event_id in zip(VECTOR_VALUES, ids, strict=False):
        event = {**orjson.loads(value), "subject": subject, "id": event_id, "prevhash": prev}
        event["hash"] = prev = compute_hash(event)
        out.append(orjson.dumps(event))
    return out


async def test_an_id_projected_in_another_stream_is_an_id_conflict_never_a_duplicate(
        store: ProjectionStore, owner: asyncpg.Connection) -> None:
    taken, parked_id = "00000000-0000-4000-8000-00000000a001", "00000000-0000-4000-8000-00000000c001"
    a = _chained("a", [taken, "00000000-0000-4000-8000-00000000a002"])
    b = _chained("b", [taken, "00000000-0000-4000-8000-00000000b002"])
    c = _chained("c", [parked_id])
    p = _chained("p", ["00000000-0000-4000-8000-00000000d001", parked_id])
    first = await store.apply_batch(records([a[0], p[1]]))  # p seq 2 parks: its id is not taken yet
    assert (first.projected, first.parked) == ([("a", 1)], 1)
    second = await store.apply_batch(records([*b, a[0], c[0]], start=10))
    assert (second.rejected, second.duplicates, second.parked) == ({"id_conflict": 1}, 1, 1)
    assert second.projected == [("c", 1)]
    third = await store.apply_batch(records([p[0]], start=20))  # p seq 2 follows, and its id is c's now
    assert (third.rejected, third.projected) == ({"id_conflict": 1}, [("p", 1)])
    letters = await owner.fetch("SELECT reason, stream_id, seq, event_id::text, error, attempts FROM dead_letters "
                                "ORDER BY id")
    # Once each: the planner knew the parked event's id was taken, PostgreSQL did not have to refuse it first.
    assert [(r["reason"], r["stream_id"], r["seq"], r["event_id"], r["attempts"]) for r in letters] == [
        ("id_conflict", "b", 1, taken, 1), ("id_conflict", "p", 2, parked_id, 1)]
    assert f"b seq 1: id {taken} is taken by a seq 1, projected with hash {orjson.loads(a[0])['hash']}" \
        in letters[0]["error"]
    assert "p seq 2" in letters[1]["error"] and "taken by c seq 1" in letters[1]["error"]
    audit = await owner.fetch("SELECT event_id::text, stream_id, seq FROM audit_log ORDER BY stream_id, seq")
    assert [tuple(r) for r in audit] == [(taken, "a", 1), (parked_id, "c", 1), (orjson.loads(p[0])["id"], "p", 1)]
    assert await owner.fetchval("SELECT count(*) FROM parked_events") == 1  # b seq 2, behind b's letter


@pytest.mark.parametrize("statement", ["UPDATE audit_log SET type = 'x'", "DELETE FROM audit_log",
                                       "TRUNCATE audit_log"])
async def test_the_worker_role_cannot_rewrite_the_audit_log(store: ProjectionStore, pool: asyncpg.Pool,
                                                            owner: asyncpg.Connection, statement: str) -> None:
    await store.apply_batch(records(VECTOR_VALUES[:3]))
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT current_user") == "runledger_worker"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)
    # Not even the owner: the database itself refuses.
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await owner.execute(statement)
    assert await owner.fetchval("SELECT count(*) FROM audit_log") == 3


async def test_migrate_is_idempotent(settings: Settings, schema: str) -> None:
    assert await migrate(settings.database_url, schema) == []


async def test_100000_micro_costs_sum_exactly_in_postgresql(store: ProjectionStore,
                                                            owner: asyncpg.Connection) -> None:
    rng = random.Random(3)
    amounts = [Decimal(rng.randint(1, 10**11)) / Decimal(10**12) for _ in range(99_998)]
    amounts += [Decimal("0.000000000001"), Decimal("0.1")]
    prev, seq, values = GENESIS_HASH, 0, []

    def add(type_: str, data: dict[str, object]) -> None:
        nonlocal prev, seq
        seq += 1
        raw = {"specversion": "1.0", "id": f"00000000-0000-4000-8000-{seq:012d}", "source": "/t", "type": type_,
               "subject": "micro", "time": "2026-11-22T10:00:00.000Z", "datacontenttype": "application/json",
               "seq": seq, "prevhash": prev, "data": data}
        raw["hash"] = prev = compute_hash(raw)
        values.append(orjson.dumps(raw))

    add("execution.started", {"workflow": "w"})
    for amount in amounts:
        add("cost.incurred", {"provider": "p", "model": "m", "input_tokens": 1, "output_tokens": 1,
                              "cost_usd": format(amount, "f")})
    for i in range(0, len(values), 10_000):
        await store.apply_batch(records(values[i:i + 10_000], start=i))
    exact = sum(amounts, Decimal(0))
    assert await owner.fetchval("SELECT cost_usd FROM executions") == exact
    assert await owner.fetchval("SELECT sum(cost_usd) FROM costs") == exact
    assert await owner.fetchval("SELECT count(*) FROM costs") == 100_000
