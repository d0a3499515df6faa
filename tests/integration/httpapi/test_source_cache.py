"""serve's source cache against the real PostgreSQL: held between requests, dropped at each change notified,
bounded by the first expiry, and holding nothing while its listening connection is down."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from runledger.projections.postgres.db import connect, connect_one
from runledger.streams.http import sourcecache
from runledger.streams.http.keys import load_key, new_credential
from runledger.streams.http.sourcecache import SourceCache
from runledger.streams.http.sources import add_source, revoke_source, rotate_source
from runledger.streams.settings import Settings
from tests.integration.conftest import poll, settings_of
from tests.integration.httpapi.serving import migrated

pytestmark = pytest.mark.timeout(60)


Held = tuple[SourceCache, Settings, asyncpg.Connection, list[str]]


@pytest.fixture
async def held(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Held]:
    """A started cache on a schema of its own (as serve's login), the owner's connection, and the source ids the
    cache read from the database, in order."""
    settings = settings_of(await migrated(env))
    reads: list[str] = []
    real = sourcecache.load_source

    async def counted(pool: Any, key: Any, source_id: str) -> Any:
        reads.append(source_id)
        return await real(pool, key, source_id)

    monkeypatch.setattr(sourcecache, "load_source", counted)
    owner = await connect_one(settings.database_dsn(), settings.db_schema)
    pool = await connect(settings.database_dsn("api"), settings.db_schema, advisory_locks=False)
    cache = SourceCache(pool, load_key(settings), settings.database_dsn("api"), settings.db_schema, reconnect_s=0.1)
    await cache.start()
    try:
        yield cache, settings, owner, reads
    finally:
        await cache.close()
        await pool.close()
        await owner.close()


async def add(owner: asyncpg.Connection, settings: Settings, source_id: str) -> None:
    await add_source(owner, load_key(settings), source_id, f"/sources/{source_id}", append_prefixes=[""],
                     read_prefixes=[""], rate_per_s=10, burst=10, credential=new_credential("v1"))


async def until_held(cache: SourceCache, reads: list[str], source_id: str) -> None:
    """Until a get of ``source_id`` reads no database: the notification of its addition has come, and it is held."""
    async def held_now() -> bool:
        await cache.get(source_id)
        before = len(reads)
        await cache.get(source_id)
        return len(reads) == before

    await poll(held_now, 5, f"{source_id} to be held")


async def test_a_held_source_is_read_once_until_a_change_is_notified(held: Any) -> None:
    cache, settings, owner, reads = held
    await add(owner, settings, "fleet")
    await until_held(cache, reads, "fleet")
    reads.clear()
    first = await cache.get("fleet")
    assert first is not None and await cache.get("fleet") == first
    assert reads == []  # from the cache

    await revoke_source(owner, "fleet")  # notified at its commit

    async def gone() -> bool:
        return await cache.get("fleet") is None

    await poll(gone, 5, "the revocation to reach the cache")
    assert reads  # read again once notified


async def test_nothing_is_held_while_the_listening_connection_is_down(held: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cache, settings, owner, reads = held
    await add(owner, settings, "fleet")
    await until_held(cache, reads, "fleet")
    refuse = [True]
    real = sourcecache.connect_one

    async def refused(*args: Any, **options: Any) -> Any:
        if refuse[0]:
            raise OSError("refused by the test")
        return await real(*args, **options)

    monkeypatch.setattr(sourcecache, "connect_one", refused)  # it cannot listen again until the test allows it
    admin = await asyncpg.connect(settings.database_dsn())
    try:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' "
                            "AND usename = 'runledger_api'")
    finally:
        await admin.close()

    async def down() -> bool:
        return not cache.listening

    await poll(down, 5, "the cache to see its connection lost")
    reads.clear()
    await cache.get("fleet")
    await cache.get("fleet")
    assert reads == ["fleet", "fleet"]  # read from the database each time while down
    refuse[0] = False

    async def back() -> bool:
        return cache.listening

    await poll(back, 10, "the cache to listen again")
    await until_held(cache, reads, "fleet")


async def test_a_source_is_held_no_longer_than_its_first_credential_lives(held: Any) -> None:
    cache, settings, owner, reads = held
    await add(owner, settings, "fleet")
    await rotate_source(owner, load_key(settings), "fleet", new_credential("v1"), overlap_s=1.0)
    record = await cache.get("fleet")
    assert record is not None and len(record.verifiers) == 2
    reads.clear()

    async def one_left() -> bool:
        got = await cache.get("fleet")
        return got is not None and len(got.verifiers) == 1

    await poll(one_left, 5, "the old credential to expire out of the cache")  # no notification: its expiry
    assert reads
