"""Every lock a batch takes is waited for a bounded time, and a transaction that holds locks while its client has
stopped is ended by PostgreSQL: each shown to matter, against the real database (without it, these tests fail).

- ``lock_timeout``: a batch behind a held lock gives up waiting, rolls back and is tried again in place, never
  forwarded to the retry topics; its waits are counted;
- ``idle_in_transaction_session_timeout``: a batch frozen with its locks held loses its session, and the batch
  behind it goes on; a signer round in a worker, which reads the log between its statements, has a bound of its
  own and is not cut off by the batches'.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from runledger.projections.postgres.db import StoreUnavailable, connect
from runledger.projections.postgres.queries import query
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.pricing import load_tokencost_catalog
from runledger.schemas.checkpoint import Signer
from runledger.streams.kafka import client_options
from runledger.streams.settings import Settings
from runledger.streams.tools.checkpoints import sign_if_due
from runledger.streams.tools.signer import LogSigner
from runledger.streams.worker.outbox import BatchHandler, Forwarder
from runledger.streams.worker.retry import RetrySchedule
from tests.conftest import VECTOR_EVENTS
from tests.integration.conftest import kafka_ledger, poll
from tests.integration.projections.test_isolation import as_records, stream


@pytest.fixture
async def bounded(settings: Settings, schema: str) -> AsyncIterator[tuple[asyncpg.Pool, Forwarder]]:
    """A worker's pool with short bounds (lock waits 0.3 s, idle transactions 1.5 s), and a started forwarder."""
    bounds = settings.model_copy(update={"db_lock_timeout_s": 0.3, "db_idle_in_transaction_timeout_s": 1.5})
    pool = await connect(settings.database_dsn("worker"), schema, session=bounds.db_session)
    forwarder = Forwarder(client_options(settings), RetrySchedule(settings.topic_prefix, (1.0,)), schema)
    await forwarder.start()
    yield pool, forwarder
    await forwarder.stop()
    pool.terminate()  # a connection a failed test left in a transaction would hold close() up


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_a_batch_behind_a_held_lock_is_tried_again_in_place_not_forwarded(
        bounded: tuple[asyncpg.Pool, Forwarder], owner: asyncpg.Connection) -> None:
    pool, forwarder = bounded
    handler = BatchHandler(ProjectionStore(pool, load_tokencost_catalog(), "test-group"), forwarder, pool)
    timeouts, forwarded = _sample("runledger_batch_lock_timeouts_total"), _sample("runledger_batches_forwarded_total")
    waited = _sample("runledger_batch_lock_wait_seconds_sum")
    holder = owner.transaction()  # another transaction on the stream: a batch or a replay that does not end
    await holder.start()
    await owner.execute(query("lock_streams"), ["held"])
    handling = asyncio.create_task(handler.handle(as_records(stream("held"))))

    async def timed_out_twice() -> bool:
        return _sample("runledger_batch_lock_timeouts_total") >= timeouts + 2

    await poll(timed_out_twice, 20, "two lock timeouts of the batch")
    assert not handling.done()
    await holder.rollback()
    result = await asyncio.wait_for(handling, 20)
    assert result is not None, "forwarded to the retry topics"
    assert len(result.projected) == 9
    assert _sample("runledger_batches_forwarded_total") == forwarded
    assert _sample("runledger_batch_lock_wait_seconds_sum") - waited >= 0.6  # two waits of 0.3 s at least


async def test_postgres_ends_a_batch_frozen_with_its_locks_and_the_batch_behind_it_goes_on(
        bounded: tuple[asyncpg.Pool, Forwarder], owner: asyncpg.Connection) -> None:
    pool, forwarder = bounded
    holding, resume = asyncio.Event(), asyncio.Event()

    async def freeze() -> None:  # its client stops between taking the locks and COMMIT
        holding.set()
        await resume.wait()

    catalog = load_tokencost_catalog()
    records = as_records(stream("frozen"))
    frozen = asyncio.create_task(ProjectionStore(pool, catalog, "test-group", after_locks=freeze).apply_batch(records))
    await asyncio.wait_for(holding.wait(), 20)
    result: Any = await asyncio.wait_for(BatchHandler(ProjectionStore(pool, catalog, "test-group"), forwarder,
                                                      pool).handle(records), 20)
    assert result is not None and len(result.projected) == 9
    resume.set()
    with pytest.raises(StoreUnavailable):  # its session is gone, and its batch with it
        await asyncio.wait_for(frozen, 20)
    assert await owner.fetchval("SELECT count(*) FROM audit_log") == 9


async def test_a_signer_round_in_a_worker_is_not_cut_off_by_the_batches_idle_bound(
        env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with kafka_ledger(env, tmp_path / "keys", monkeypatch) as ledger:
        await ledger.append(VECTOR_EVENTS)
        await ledger.project()
        assert ledger.run("keys", "init").returncode == 0
        bounds = ledger.settings.model_copy(update={"db_idle_in_transaction_timeout_s": 0.5})
        pool = await connect(bounds.database_dsn("worker"), bounds.db_schema, session=bounds.db_session)
        signer = LogSigner(ledger.settings, Signer.from_private_key(ledger.settings.checkpoint_key_path.read_text()))
        read = signer._read_checkpoints  # noqa: SLF001

        async def slow_read() -> Any:  # the round reads Kafka inside its transaction longer than a batch may idle
            await asyncio.sleep(1.5)
            return await read()

        monkeypatch.setattr(signer, "_read_checkpoints", slow_read)
        await signer.start()
        try:
            done = await sign_if_due(signer, pool, 0)
        finally:
            await signer.stop()
            await pool.close()
        assert done is not None and done.signed
        assert await ledger.conn.fetchval("SELECT count(*) FROM checkpoints") == len(done.signed)
