"""The per-partition transparency logs the store keeps: a leaf for every record read from the log (valid or not),
in offset order, every perfect subtree stored; records applied later find their leaf by position; and only the
partition's own row is locked."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import orjson
import pytest

from runledger.projections.postgres.db import connect, migrate
from runledger.projections.postgres.queries import migrations, quote_schema
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.records import LogRecord
from runledger.schemas.merkle import fold, leaf_hash, root_of, subtrees
from runledger.streams.settings import Settings
from tests.conftest import VECTOR_EVENTS
from tests.integration.conftest import rechain


def records(events: list[dict[str, object]] | list[bytes], start: int = 0, partition: int = 0) -> list[LogRecord]:
    return [LogRecord("t.events", partition, start + i, b"k", e if isinstance(e, bytes) else orjson.dumps(e))
            for i, e in enumerate(events)]


async def check_tree(owner: asyncpg.Connection, values: list[bytes], partition: int = 0) -> int:
    """Assert the partition's stored tree is the RFC 9162 tree over ``values`` (leaf i: SHA-256(0x00 || value))."""
    tree = await owner.fetchrow("SELECT * FROM log_trees WHERE topic = 't.events' AND partition = $1", partition)
    leaves = [leaf_hash(v) for v in values]
    size = tree["size"]
    assert size == len(values) and tree["next_offset"] == len(values)
    nodes = {(r["level"], r["index"]): r["hash"] for r in await owner.fetch(
        "SELECT * FROM log_tree_nodes WHERE tree = $1", tree["id"])}
    assert nodes == {(lv, i): root_of(leaves[i << lv:(i + 1) << lv])
                     for lv in range(size.bit_length()) for i in range(size >> lv)}  # every perfect subtree
    assert fold(list(tree["peaks"])) == root_of(leaves) and list(tree["peaks"]) == [nodes[n] for n in subtrees(0, size)]
    offsets = [r[0] for r in await owner.fetch(
        "SELECT kafka_offset FROM log_tree_nodes WHERE tree = $1 AND level = 0 ORDER BY index", tree["id"])]
    assert offsets == list(range(size))
    return int(size)


async def test_every_record_read_is_a_leaf_and_every_event_names_its_own(store: ProjectionStore,
                                                                         owner: asyncpg.Connection) -> None:
    values = [orjson.dumps(e) for e in [*VECTOR_EVENTS, *rechain("extra-1")]]
    values.insert(5, b"not json")  # a record that is no event is a leaf too: the tree commits to the partition
    for start in range(0, len(values), 7):  # batches of 7: the tree grows across them
        await store.apply_batch(records(values[start:start + 7], start))
    assert await check_tree(owner, values) == len(values)
    await store.apply_batch(records(values[:9]))  # delivered again: no leaf twice
    assert await check_tree(owner, values) == len(values)
    rows = await owner.fetch("SELECT kafka_offset, leaf_index, tree FROM audit_log ORDER BY kafka_offset")
    assert [r["leaf_index"] for r in rows] == [r["kafka_offset"] for r in rows] and len(rows) == len(values) - 1


async def test_a_record_applied_from_a_retry_topic_finds_its_leaf_by_position(store: ProjectionStore,
                                                                                owner: asyncpg.Connection) -> None:
    events = rechain("late")
    log = [orjson.dumps(e) for e in (events[0], events[2], events[1], *events[3:])]  # seq 3 before seq 2
    read = records(log)
    result = await store.apply_batch(read[:2], route=lambda retry, dead: [])
    assert [f.seq for f in result.retry] == [3]  # its predecessor is not projected yet: to the retry topics
    await store.apply_batch(read[2:], route=lambda retry, dead: [])  # seq 4.. wait behind seq 3 (retried too)
    await store.apply_batch([LogRecord("t.events", 0, 1, b"k", log[1], attempts=1)])  # the retried copy
    assert await check_tree(owner, log) == len(log)
    rows = await owner.fetch("SELECT kafka_offset, leaf_index FROM audit_log ORDER BY kafka_offset")
    assert [(r["kafka_offset"], r["leaf_index"]) for r in rows][:3] == [(0, 0), (1, 1), (2, 2)]


async def test_workers_of_different_partitions_lock_only_their_own_tree(settings: Settings, schema: str,
                                                                         owner: asyncpg.Connection,
                                                                         store: ProjectionStore) -> None:
    pool = await connect(settings.database_dsn("worker"), schema)
    other = ProjectionStore(pool, store.catalog, "test-group")
    try:
        async with owner.transaction():  # partition 0's owner is mid-batch, holding its tree's row
            await owner.execute("INSERT INTO log_trees (topic, partition) VALUES ('t.events', 0)")
            await owner.execute("SELECT * FROM log_trees WHERE partition = 0 FOR UPDATE")
            values = [orjson.dumps(e) for e in rechain("p1")]
            async with asyncio.timeout(10):  # another partition's batch does not wait for it
                await other.apply_batch(records(values, partition=1))
        streams = [[orjson.dumps(e) for e in rechain(f"s{n}")] for n in range(8)]
        await asyncio.gather(*(s.apply_batch(records(v, partition=2 + n)) for n, v in enumerate(streams)
                               for s in [(store, other)[n % 2]]))
    finally:
        await pool.close()
    assert await check_tree(owner, values, 1) == 9
    for n, v in enumerate(streams):
        assert await check_tree(owner, v, 2 + n) == 9


async def test_the_migration_retires_the_single_tree_and_keeps_its_checkpoints(settings: Settings,
                                                                                store: ProjectionStore) -> None:
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():  # a schema as migration 011 left it
            await conn.execute(f"CREATE SCHEMA {quote_schema(name)}; SET LOCAL search_path TO {quote_schema(name)}")
            await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
                               "applied_at timestamptz NOT NULL DEFAULT now())")
            for version, migration, sql in migrations():
                if version < 12:
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2)", version, migration)
            await conn.execute("INSERT INTO checkpoints (origin, size, root, key_name, note) VALUES "
                               "('runledger.test/log', 18, '\\x00', 'k', 'note')")
        assert (await migrate(settings.database_url, name))[0] == "012_partition_trees"  # then any later ones
        await conn.execute(f"SET search_path TO {quote_schema(name)}")
        assert await conn.fetchval("SELECT kafka_partition IS NULL FROM checkpoints") is True
        assert await conn.fetchval("SELECT to_regclass('tlog_state')") is None
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote_schema(name)} CASCADE")
        await conn.close()


async def test_a_key_that_cannot_be_read_never_stops_a_worker(settings: Settings, pool: asyncpg.Pool,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from runledger.streams.worker.app import _Ready, _sign_checkpoint

    key = tmp_path / "checkpoint.key"
    key.write_text("PRIVATE+KEY+not+a+key")
    monkeypatch.setenv("RUNLEDGER_CHECKPOINT_KEY", str(key))
    await _sign_checkpoint(Settings(), _Ready(pool, None, None))  # type: ignore[arg-type]  # says so, returns
    assert "cannot be used" in caplog.text and "no checkpoint is signed" in caplog.text
