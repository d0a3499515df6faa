"""The transparency log kept by the store: leaves in commit order, every perfect subtree stored, the root at
any size from O(log n) rows; and migration 005 building it for events stored before."""

from __future__ import annotations

import asyncio
import functools
import uuid

import asyncpg
import orjson

from runledger.projections.postgres.db import connect, migrate
from runledger.projections.postgres.queries import migrations, quote_schema
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.postgres.tlog import sign_if_due
from runledger.projections.records import LogRecord
from runledger.schemas.checkpoint import Signer, Verifier
from runledger.schemas.merkle import fold, leaf_hash, root_of, subtrees
from runledger.streams.settings import Settings
from tests.conftest import VECTOR_EVENTS
from tests.integration.conftest import rechain


def records(events: list[dict[str, object]], start: int = 0) -> list[LogRecord]:
    return [LogRecord("t.events", 0, start + i, str(e["subject"]).encode(), orjson.dumps(e))
            for i, e in enumerate(events)]


async def check_tree(owner: asyncpg.Connection) -> int:
    """Assert the stored tree is the RFC 9162 tree over the audit rows in tlog_index order; its size."""
    size = await owner.fetchval("SELECT size FROM tlog_state")
    hashes = [r["hash"] for r in await owner.fetch("SELECT hash, tlog_index FROM audit_log ORDER BY tlog_index")]
    indexes = [r[0] for r in await owner.fetch("SELECT tlog_index FROM audit_log ORDER BY tlog_index")]
    assert indexes == list(range(size))
    leaves = [leaf_hash(bytes.fromhex(h)) for h in hashes]
    nodes = {(r["level"], r["index"]): r["hash"] for r in await owner.fetch("SELECT * FROM tlog_nodes")}
    assert nodes == {(lv, i): root_of(leaves[i << lv:(i + 1) << lv])
                     for lv in range(size.bit_length()) for i in range(size >> lv)}  # every perfect subtree
    peaks = [nodes[n] for n in subtrees(0, size)]
    assert fold(peaks) == root_of(leaves) and list(await owner.fetchval("SELECT peaks FROM tlog_state")) == peaks
    return int(size)


async def test_each_batch_appends_its_events_as_leaves(store: ProjectionStore, owner: asyncpg.Connection) -> None:
    events = [*VECTOR_EVENTS, *rechain("extra-1"), *rechain("extra-2")]
    for start in range(0, len(events), 7):  # batches of 7: the tree grows across them
        await store.apply_batch(records(events[start:start + 7], start))
    assert await check_tree(owner) == len(events)
    await store.apply_batch(records(events[:5]))  # duplicates: no leaf
    assert await check_tree(owner) == len(events)


async def test_workers_appending_at_once_make_one_tree(settings: Settings, schema: str, owner: asyncpg.Connection,
                                                        store: ProjectionStore) -> None:
    pool = await connect(settings.database_url, schema)
    other = ProjectionStore(pool, store.catalog, "test-group")
    try:
        streams = [rechain(f"s{n}") for n in range(16)]
        await asyncio.gather(*(s.apply_batch(records(events, 100 * n)) for n, events in enumerate(streams)
                               for s in [(store, other)[n % 2]]))
    finally:
        await pool.close()
    assert await check_tree(owner) == 16 * 9


async def test_the_migration_builds_the_tree_of_events_stored_before(settings: Settings, store: ProjectionStore,
                                                                      owner: asyncpg.Connection) -> None:
    await store.apply_batch(records([*VECTOR_EVENTS, *rechain("extra")]))
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():  # a schema as migration 004 left it, holding the same events
            await conn.execute(f"CREATE SCHEMA {quote_schema(name)}; SET LOCAL search_path TO {quote_schema(name)}")
            await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
                               "applied_at timestamptz NOT NULL DEFAULT now())")
            for version, migration, sql in migrations():
                if version < 5:
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2)", version, migration)
            columns = [r[0] for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND "
                "table_name = 'audit_log' ORDER BY ordinal_position", name)]
            listed = ", ".join(columns)
            await conn.execute(f"INSERT INTO audit_log ({listed}) OVERRIDING SYSTEM VALUE SELECT {listed} "
                               f"FROM {quote_schema(owner_schema(owner))}.audit_log")
        applied = await migrate(settings.database_url, name)
        assert applied[:2] == ["005_transparency_log", "006_checkpoints"] and len(applied) == len(migrations()) - 4
        await conn.execute(f"SET search_path TO {quote_schema(name)}")
        assert await check_tree(conn) == 27
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote_schema(name)} CASCADE")
        await conn.close()


def owner_schema(owner: asyncpg.Connection) -> str:
    settings = owner.get_settings()
    return str(settings.search_path).strip('"')


async def test_a_checkpoint_is_signed_when_due_by_one_worker_at_a_time(pool: asyncpg.Pool, store: ProjectionStore,
                                                                      owner: asyncpg.Connection) -> None:
    signer = Signer.generate("runledger.test/log")
    sign = functools.partial(sign_if_due, pool, signer, "runledger.test/log", "t.checkpoints")
    await store.apply_batch(records(VECTOR_EVENTS))
    first = await sign(60.0)
    assert first is not None and first.checkpoint.size == 18
    assert await sign(60.0) is None  # one within the interval
    assert await sign(0.0) is None  # the tree has not grown
    await store.apply_batch(records(rechain("extra"), 100))
    signed = [kept for kept in await asyncio.gather(*(sign(0.0) for _ in range(4))) if kept is not None]
    assert [kept.checkpoint.size for kept in signed] == [27]  # four workers' timers at once: one signs
    verifier = Verifier(signer.verifier_key)
    notes = [bytes(r["value"]).decode() for r in await owner.fetch(
        "SELECT value FROM outbox WHERE topic = 't.checkpoints' ORDER BY id")]
    assert [verifier.open(n).size for n in notes] == [18, 27]  # published by the outbox once committed
