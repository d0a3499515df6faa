"""Publishing the outbox holds no transaction, no lock and no connection while its copies are on their way to Kafka
(a slow broker must not starve the batches or the heartbeat of connections, nor keep rows locked); a publisher that
dies between publishing and marking its rows loses nothing, and the copy it sent twice is projected once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from runledger.projections.postgres.db import connect
from runledger.projections.postgres.queries import query
from runledger.projections.postgres.store import ProjectionStore
from runledger.streams.kafka import client_options
from runledger.streams.settings import Settings
from runledger.streams.worker.outbox import BatchHandler, Forwarder
from runledger.streams.worker.retry import RetrySchedule, from_retry_topic, message_time
from tests.integration.conftest import poll, read_log
from tests.integration.projections.test_isolation import as_records, stream

PUBLISHER = "runledger-test-publisher"


@pytest.fixture
async def forwarder(settings: Settings, schema: str) -> AsyncIterator[Forwarder]:
    forwarder = Forwarder(client_options(settings), RetrySchedule(settings.topic_prefix, (1.0,)), schema, claim_s=1.0)
    await forwarder.start()
    yield forwarder
    await forwarder.stop()


async def _one_retry_copy(store: ProjectionStore, forwarder: Forwarder) -> list[dict[str, Any]]:
    """A stream whose seq 2 came first: seq 2's copy for the retry topic waits in the outbox. Its events."""
    events = stream("late")
    result = await store.apply_batch(as_records(events[1:2]), route=forwarder.schedule.route)
    assert [f.seq for f in result.retry] == [2] and result.rows["outbox"] == 1
    return events


async def test_a_stalled_publish_holds_no_transaction_lock_or_connection(
        settings: Settings, schema: str, store: ProjectionStore, forwarder: Forwarder, owner: asyncpg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await _one_retry_copy(store, forwarder)
    # One connection for the publisher and the heartbeat: a publish that kept it would starve the heartbeat.
    pool = await connect(settings.database_dsn("worker"), schema, max_size=1,
                         session={**settings.db_session, "application_name": PUBLISHER})
    sending, broker_back = asyncio.Event(), asyncio.Event()
    send = forwarder._kafka.send  # noqa: SLF001 - the broker, slowed down

    async def slow_send(*args: Any, **kwargs: Any) -> Any:
        sending.set()
        await broker_back.wait()
        return await send(*args, **kwargs)

    monkeypatch.setattr(forwarder._kafka, "send", slow_send)  # noqa: SLF001
    try:
        publishing = asyncio.create_task(BatchHandler(store, forwarder, pool).publish())
        await asyncio.wait_for(sending.wait(), 20)
        # While the copy is on its way: the heartbeat writes, no transaction is open, and the row is not locked.
        await asyncio.wait_for(pool.execute(query("worker_seen"), "w-1", "g", "host", 1, await owner.fetchval(
            "SELECT now()"), [0], None), 5)
        open_transactions = await owner.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND xact_start IS NOT NULL", PUBLISHER)
        assert open_transactions == 0
        async with owner.transaction():
            locked = await owner.fetch("SELECT id, claimed_until FROM outbox FOR UPDATE NOWAIT")
        assert len(locked) == 1 and locked[0]["claimed_until"] is not None  # claimed: a time in the row, no lock
        broker_back.set()
        assert await asyncio.wait_for(publishing, 40) == 1
    finally:
        broker_back.set()
        await pool.close()
    assert await owner.fetchval("SELECT count(*) FROM outbox") == 0
    assert len(await read_log(settings, forwarder.schedule.topic(1.0))) == 1


class _Died(BaseException):
    """The publishing process dies here."""


async def test_a_publisher_dead_between_publishing_and_marking_loses_nothing_and_duplicates_nothing(
        settings: Settings, store: ProjectionStore, pool: asyncpg.Pool, forwarder: Forwarder,
        owner: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    events = await _one_retry_copy(store, forwarder)
    settle = forwarder._settle  # noqa: SLF001

    async def die(*args: Any) -> None:
        raise _Died

    monkeypatch.setattr(forwarder, "_settle", die)
    with pytest.raises(_Died):  # Kafka acknowledged the copy; its row is not marked
        await forwarder.publish(pool)
    monkeypatch.setattr(forwarder, "_settle", settle)
    kept = await owner.fetch("SELECT claimed_until FROM outbox")
    assert len(kept) == 1 and kept[0]["claimed_until"] is not None  # kept, claimed for a while by the dead one

    async def sent_again() -> bool:
        return await forwarder.publish(pool) == 1

    await poll(sent_again, 20, "the row claimed again once its claim ran out, and sent again")
    assert await owner.fetchval("SELECT count(*) FROM outbox") == 0
    topic = forwarder.schedule.topic(1.0)
    copies = await read_log(settings, topic)
    assert len(copies) == 2 and copies[0].value == copies[1].value == orjson.dumps(events[1])
    # Read from the retry topic once seq 1 is there: seq 2 is projected once, its second copy is a duplicate.
    await store.apply_batch(as_records(events[:1], start=1))
    retried = [from_retry_topic(m.topic, m.partition, m.offset, m.key, m.value or b"", m.headers or [],
                                message_time(m.timestamp), 1.0)[0] for m in copies]
    result = await store.apply_batch(retried, route=forwarder.schedule.route)
    assert result.projected == [(events[1]["subject"], 2)] and result.duplicates == 1
    assert await owner.fetchval("SELECT count(*) FROM audit_log") == 2
