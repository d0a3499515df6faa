"""`runledger verify chains` against tables a database superuser has tampered with."""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.postgres.verify import ProjectionReport, verify_chains, verify_projection
from runledger.projections.records import LogRecord
from runledger.schemas.chain import compute_hash
from runledger.streams.settings import Settings
from tests.conftest import CLI, VECTOR_EVENTS
from tests.integration.conftest import rechain

A, B, C, D, E = "exec-2026-11-22-0001", "exec-2026-11-22-0002", "tenant:eu.exec_0003", "exec-2026-11-22-0004", "extra"


async def project(store: ProjectionStore) -> None:
    events = [*VECTOR_EVENTS, *rechain(E)]
    result = await store.apply_batch([LogRecord("t.events", 0, i, e["subject"].encode(), orjson.dumps(e))
                                      for i, e in enumerate(events)])
    assert len(result.projected) == len(events)


async def raw_of(owner: asyncpg.Connection, stream: str, seq: int) -> bytes:
    return await owner.fetchval("SELECT raw FROM audit_log WHERE stream_id = $1 AND seq = $2", stream, seq)


async def tamper(owner: asyncpg.Connection) -> None:
    """As a superuser: the append-only triggers switched off for this session."""
    await owner.execute("SET session_replication_role = replica")
    changed = orjson.loads(await raw_of(owner, A, 3))  # A: one event's data changed, its hash kept
    changed["data"]["input_tokens"] += 1
    await owner.execute("UPDATE audit_log SET raw = $1 WHERE stream_id = $2 AND seq = 3", orjson.dumps(changed), A)
    await owner.execute("DELETE FROM audit_log WHERE stream_id = $1 AND seq = 2", B)  # B: a row deleted
    one, two = await raw_of(owner, C, 1), await raw_of(owner, C, 2)  # C: two rows' payloads swapped
    await owner.execute("UPDATE audit_log SET raw = CASE seq WHEN 1 THEN $2::bytea ELSE $3::bytea END "
                        "WHERE stream_id = $1 AND seq IN (1, 2)", C, two, one)
    last = orjson.loads(await raw_of(owner, D, 2))  # D: a forged event with a valid hash, appended
    forged = {**last, "id": str(uuid.uuid4()), "seq": 3, "prevhash": last["hash"], "type": "execution.completed",
              "data": {}}
    forged["hash"] = compute_hash(forged)
    await owner.execute(
        "INSERT INTO audit_log (event_id, stream_id, seq, type, source, specversion, datacontenttype, time, hash, "
        "raw, prevhash, kafka_topic, kafka_partition, kafka_offset) SELECT $1::uuid, stream_id, 3, type, "
        "source, specversion, datacontenttype, time, $2, $3, $4, kafka_topic, kafka_partition, kafka_offset + 1000 "
        "FROM audit_log WHERE stream_id = $5 AND seq = 2",
        forged["id"], forged["hash"], orjson.dumps(forged),
        forged["prevhash"], D)
    await owner.execute("DELETE FROM audit_log WHERE stream_id = $1", E)  # E: a whole stream deleted


async def test_every_tampering_is_named_by_stream_and_seq(settings: Settings, schema: str, store: ProjectionStore,
                                                         owner: asyncpg.Connection) -> None:
    await project(store)
    intact = await verify_chains(settings.database_url, schema)
    assert intact.intact and (intact.events, intact.streams) == (27, 5)
    await tamper(owner)
    report = await verify_chains(settings.database_url, schema)
    found = {f.stream_id: (f.seq, f.code) for f in report.findings}
    assert found == {A: (3, "hash_mismatch"), B: (3, "seq_gap"), C: (1, "row_mismatch"), D: (3, "head_mismatch"),
                     E: (9, "stream_missing")}
    by_stream = {f.stream_id: f for f in report.findings}
    assert "seq 2 is missing" in by_stream[B].reason and "column seq is 1" in by_stream[C].reason
    assert by_stream[A].event_id == VECTOR_EVENTS[2]["id"]
    only = await verify_chains(settings.database_url, schema, stream=D)
    assert [(f.stream_id, f.code) for f in only.findings] == [(D, "head_mismatch")] and only.events == 3


async def test_the_command_says_where_and_exits_1(settings: Settings, schema: str, store: ProjectionStore,
                                                  owner: asyncpg.Connection, env: dict[str, str]) -> None:
    await project(store)
    run_env = {**os.environ, **env, "RUNLEDGER_DB_SCHEMA": schema}
    ok = subprocess.run([*CLI, "verify", "chains"], env=run_env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "27 events of 5 streams" in ok.stdout and "intact" in ok.stdout
    await tamper(owner)
    human = subprocess.run([*CLI, "verify", "chains", "--stream", A], env=run_env, capture_output=True, text=True,
                           timeout=120)
    assert human.returncode == 1 and f"NOT INTACT  {A}  seq 3" in human.stdout and "hash_mismatch" in human.stdout
    machine = subprocess.run([*CLI, "verify", "chains", "--json"], env=run_env, capture_output=True, text=True,
                             timeout=120)
    report = orjson.loads(machine.stdout)
    assert machine.returncode == 1 and report["intact"] is False and report["events"] == 18
    assert {f["code"] for f in report["findings"]} == {"hash_mismatch", "seq_gap", "row_mismatch", "head_mismatch",
                                                       "stream_missing"}


async def test_projection_tampering_is_named_by_table_and_row(settings: Settings, schema: str, pool: asyncpg.Pool,
                                                              store: ProjectionStore, owner: asyncpg.Connection,
                                                              env: dict[str, str]) -> None:
    await ProjectionStore.save_catalog(pool, store.catalog)  # as a worker does when it starts
    await project(store)
    intact = await verify_projection(settings.database_url, schema)
    assert intact.intact, [f.reason for f in intact.findings]
    assert (intact.events, intact.streams) == (27, 5)
    priced = VECTOR_EVENTS[4]["id"]  # A seq 5: priced from the catalog
    # The cost row alone is changed: the execution's and the step's totals still say what the events give.
    await owner.execute("UPDATE costs SET cost_usd = cost_usd + 0.01 WHERE event_id = $1", priced)
    await owner.execute("UPDATE executions SET input_tokens = 1 WHERE stream_id = $1", B)
    await owner.execute("DELETE FROM steps WHERE stream_id = $1 AND step_id = 's2'", A)
    await owner.execute("INSERT INTO artifacts (stream_id, artifact_id, type, name, uri, created_at, seq) "
                        "VALUES ($1, 'forged', 'file', 'f', 's3://x', now(), 2)", C)
    await owner.execute("INSERT INTO executions (stream_id, workflow, status, started_at, last_seq, last_hash, "
                        "updated_at) VALUES ('ghost', 'w', 'running', now(), 1, 'x', now())")
    report = await verify_projection(settings.database_url, schema)
    found = {(f.table, f.key, f.code) for f in report.findings}
    assert found == {("costs", priced, "row_differs"), ("executions", B, "row_differs"), ("steps", "s2", "row_missing"),
                     ("artifacts", "forged", "row_extra"), ("executions", "ghost", "row_extra")}
    by_key = {f.key: f for f in report.findings}
    assert by_key[priced].stream_id == A and by_key[priced].seq == 5 and by_key[priced].event_id == priced
    assert "cost_usd is Decimal(" in by_key[priced].reason
    assert "input_tokens is 1" in by_key[B].reason
    assert by_key[B].reason.startswith(f"executions row stream_id={B!r}: ")
    only = await verify_projection(settings.database_url, schema, stream=C)
    assert [(f.table, f.key) for f in only.findings] == [("artifacts", "forged")] and only.events == 3
    command = subprocess.run([*CLI, "verify", "projection", "--json"], env={**os.environ, **env,
                             "RUNLEDGER_DB_SCHEMA": schema}, capture_output=True, text=True, timeout=120)
    assert command.returncode == 1, command.stderr
    assert {(f["table"], f["key"]) for f in orjson.loads(command.stdout)["findings"]} == {k[:2] for k in found}


async def test_the_projection_check_prices_with_the_catalog_version_the_row_names(
        settings: Settings, schema: str, pool: asyncpg.Pool, store: ProjectionStore) -> None:
    await ProjectionStore.save_catalog(pool, store.catalog)
    await project(store)
    newer = replace(store.catalog, version="newer", prices={
        model: replace(price, input=price.input * 2) for model, price in store.catalog.prices.items()})
    await ProjectionStore.save_catalog(pool, newer)  # a later worker brought new prices
    assert await ProjectionStore.load_catalog(pool) is not None
    report = await verify_projection(settings.database_url, schema)
    assert report.intact, [f.as_dict() for f in report.findings]


async def test_attested_streams_are_not_derived_again_until_their_events_or_rows_change(
        settings: Settings, schema: str, pool: asyncpg.Pool, store: ProjectionStore, owner: asyncpg.Connection,
        tmp_path: Path) -> None:
    await ProjectionStore.save_catalog(pool, store.catalog)
    await project(store)
    kept = tmp_path / "verified.json"

    async def check(**options: Any) -> ProjectionReport:
        return await verify_projection(settings.database_url, schema, attestations=kept, **options)

    first = await check()
    assert first.intact and (first.events, first.streams, first.derived_streams, first.derived_events) == (27, 5, 5, 27)
    again = await check()
    assert again.intact and (again.events, again.streams, again.derived_streams) == (27, 5, 0)
    # A cost changed in the table: its stream alone is derived again, and the change is found.
    priced = VECTOR_EVENTS[4]["id"]
    await owner.execute("UPDATE costs SET cost_usd = cost_usd + 0.01 WHERE event_id = $1", priced)
    tampered = await check()
    assert [(f.stream_id, f.table, f.key, f.code) for f in tampered.findings] == [(A, "costs", priced, "row_differs")]
    assert tampered.derived_streams == 1
    still = await check()  # a stream found not intact is not attested: found again on the next run
    assert [f.key for f in still.findings] == [priced] and still.derived_streams == 1
    await owner.execute("UPDATE costs SET cost_usd = cost_usd - 0.01 WHERE event_id = $1", priced)
    # An event's bytes changed, rows untouched: the digest of the events changes, so the stream is derived.
    await owner.execute("SET session_replication_role = replica")
    changed = orjson.loads(await raw_of(owner, B, 2))
    changed["data"]["name"] = "renamed"
    await owner.execute("UPDATE audit_log SET raw = $1 WHERE stream_id = $2 AND seq = 2", orjson.dumps(changed), B)
    event_changed = await check()
    assert [(f.stream_id, f.seq, f.code) for f in event_changed.findings] == [(B, 2, "event_refused")]
    assert "hash" in event_changed.findings[0].reason
    assert event_changed.derived_streams == 2  # A (fixed since) and B
    # A catalog price changed: nothing attested holds, every stream is derived.
    await owner.execute("UPDATE model_prices SET input_usd_per_token = input_usd_per_token * 2 "
                        "WHERE version = $1", store.catalog.version)
    repriced = await check()
    assert repriced.derived_streams == 5 and "price catalogs changed" in (repriced.note or "")
    assert A in {f.stream_id for f in repriced.findings}
    full = await check(full=True)
    assert full.derived_streams == 5 and full.note is None
    one = await check(stream=C, full=True)  # --full on one stream keeps what is attested of the others
    assert one.derived_streams == 1
    after = await check()
    assert after.derived_streams == len({f.stream_id for f in full.findings})  # those not intact, alone



@pytest.mark.slow
async def test_bench_verify_prints_the_rates_of_each_check(schema: str, pool: asyncpg.Pool, store: ProjectionStore,
                                                           env: dict[str, str]) -> None:
    await ProjectionStore.save_catalog(pool, store.catalog)
    await project(store)
    done = subprocess.run([*CLI, "bench-verify", "--runs", "2", "--checks", "chains,projection", "--json"],
                          env={**os.environ, **env, "RUNLEDGER_DB_SCHEMA": schema}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert list(report["checks"]) == ["chains", "projection"]
    for results in report["checks"].values():
        assert len(results) == 2 and all(r["events"] == 27 and r["intact"] for r in results)
        assert all(r["seconds"] > 0 and r["events_per_s"] > 0 and r["postgres_cpu_s"] >= 0 for r in results)
    assert [r["derived_events"] for r in report["checks"]["projection"]] == [0, 0]  # attested by a run before
    human = subprocess.run([*CLI, "bench-verify", "--runs", "1", "--checks", "nonsense"], env={**os.environ, **env},
                           capture_output=True, text=True, timeout=60)
    assert human.returncode == 2 and "give one or more of chains, projection" in human.stderr
