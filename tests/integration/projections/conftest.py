"""A fresh, migrated PostgreSQL schema per test, and a store on it acting as the worker role."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from runledger.projections.postgres.db import connect, migrate
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.pricing import load_tokencost_catalog
from runledger.streams.settings import Settings


@pytest.fixture
async def schema(settings: Settings) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    await migrate(settings.database_url, name)
    yield name
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f'DROP SCHEMA "{name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def pool(settings: Settings, schema: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await connect(settings.database_dsn("worker"), schema)
    yield pool
    await pool.close()


@pytest.fixture
async def owner(settings: Settings, schema: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the schema's owner, to read everything back."""
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": schema})
    yield conn
    await conn.close()


@pytest.fixture
async def store(pool: asyncpg.Pool) -> ProjectionStore:
    catalog = load_tokencost_catalog()
    return ProjectionStore(pool, catalog, "test-group")
