"""The mechanisms that keep concurrent work apart, each shown to matter: without it, these tests fail.

- the per-stream advisory lock: a batch, a retry batch and a replay never meet on one stream;
- the apply lock: `runledger rebuild` switches schemas only between two batches;
- the NOTIFY on commit: `runledger wait` answers at once, not at its next look.
"""

from __future__ import annotations

import asyncio

import asyncpg

from runledger.projections.postgres.queries import query
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.postgres.wait import wait_projected
from runledger.streams.settings import Settings
from tests.integration.projections.test_isolation import as_records, stream


async def test_a_batch_waits_for_another_transaction_on_its_stream(store: ProjectionStore, pool: asyncpg.Pool,
                                                                   owner: asyncpg.Connection) -> None:
    events = stream("locked")
    async with pool.acquire() as conn:
        first = conn.transaction()
        await first.start()
        await store.apply_on(conn, as_records(events[:2]))  # seq 1, 2: holds the stream until it commits
        second = asyncio.create_task(store.apply_batch(as_records(events[2:3], start=10)))  # seq 3
        done, _ = await asyncio.wait({second}, timeout=1.5)
        assert not done, "seq 3 must wait while seq 1 and 2 are being applied"
        await first.commit()
    result = await asyncio.wait_for(second, 10)
    # Had it not waited, it would have seen an empty stream and parked seq 3 behind a gap for ever.
    assert result.projected == [("locked", 3)] and result.parked == 0
    assert await owner.fetchval("SELECT count(*) FROM parked_events") == 0


async def test_a_switch_over_waits_for_the_batch_in_flight(settings: Settings, store: ProjectionStore,
                                                           pool: asyncpg.Pool, schema: str) -> None:
    switcher = await asyncpg.connect(settings.database_url)
    try:
        async with pool.acquire() as conn:
            batch = conn.transaction()
            await batch.start()
            await store.apply_on(conn, as_records(stream("in-flight")[:3]))

            async def switch() -> None:
                async with switcher.transaction():
                    await switcher.execute(query("switch_lock"), schema)

            taken = asyncio.create_task(switch())
            done, _ = await asyncio.wait({taken}, timeout=1.5)
            assert not done, "the switch-over must wait until the batch commits"
            await batch.commit()
        await asyncio.wait_for(taken, 10)
    finally:
        await switcher.close()


async def test_a_waiter_wakes_on_the_commit_not_on_its_next_look(settings: Settings, store: ProjectionStore,
                                                                 schema: str) -> None:
    events = stream("notified")
    waiter = asyncio.create_task(wait_projected(settings.database_url, schema, "notified", 9, timeout=20,
                                                recheck_s=60))  # it looks again only after a minute
    await asyncio.sleep(0.5)  # listening, and has looked once
    assert not waiter.done()
    await store.apply_batch(as_records(events))
    result = await asyncio.wait_for(waiter, 25)
    assert result.status == "projected" and result.waited_s < 10
