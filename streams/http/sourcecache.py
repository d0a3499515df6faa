"""``serve``'s sources, held between requests while PostgreSQL says they are unchanged.

Reading a request's source costs two PostgreSQL round trips (the query and the pool's reset) and an AES-GCM
opening per credential: a twentieth of ``serve``'s CPU per single-event append. The cache holds each source read,
and is emptied whenever migration 019's triggers notify ``runledger_sources`` with this schema's name (a source or
credential added, rotated, revoked or deleted, at its commit). It holds nothing while its listening connection is
down (reconnecting once a second meanwhile): then every request reads the database, as without it. A source is held
at most ``max_age_s`` and never past its first credential's expiry, and what a read returns is not kept if a change
was notified while it was under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from runledger.projections.postgres.db import connect_one
from runledger.streams.http.keys import SourcesKey
from runledger.streams.http.sources import SourceRecord, load_source

__all__ = ["CHANNEL", "SourceCache"]

log = logging.getLogger(__name__)

CHANNEL = "runledger_sources"


@dataclass(frozen=True, slots=True)
class _Held:
    record: SourceRecord
    until: float  # time.monotonic()


class SourceCache:
    """``get`` a source as ``load_source`` does, from what is held when it may be."""

    def __init__(self, pool: asyncpg.Pool, key: SourcesKey, dsn: str, schema: str, *, max_age_s: float = 60.0,
                 max_sources: int = 10_000, reconnect_s: float = 1.0) -> None:
        self._pool, self._key, self._dsn, self._schema = pool, key, dsn, schema
        self._max_age_s, self._max_sources, self._reconnect_s = max_age_s, max_sources, reconnect_s
        self._held: dict[str, _Held] = {}
        self._generation = 0  # one more at each change notified or listening lost
        self._listener: asyncpg.Connection | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def listening(self) -> bool:
        return self._listener is not None

    async def start(self) -> None:
        """Listen for changes; if PostgreSQL cannot be reached, hold nothing and keep trying in the background."""
        if not await self._listen():
            self._reconnecting = asyncio.create_task(self._reconnect())

    async def get(self, source_id: str) -> SourceRecord | None:
        """The source ``source_id`` with its usable credentials, or None (see ``load_source``)."""
        held = self._held.get(source_id)
        if held is not None and self._listener is not None and time.monotonic() < held.until:
            return held.record
        generation, started = self._generation, time.monotonic()
        record = await load_source(self._pool, self._key, source_id)
        if record is not None and self._listener is not None and generation == self._generation:
            if len(self._held) >= self._max_sources:
                self._held.clear()
            age = self._max_age_s if record.expires_in_s is None else min(self._max_age_s, record.expires_in_s)
            self._held[source_id] = _Held(record, started + age)
        return record

    def _forget(self) -> None:
        self._generation += 1
        self._held.clear()

    def _changed(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload == self._schema:
            self._forget()

    def _lost(self, _conn: Any) -> None:
        self._listener = None
        self._forget()
        if not self._closed and (self._reconnecting is None or self._reconnecting.done()):
            log.warning("the sources' change notifications stopped (PostgreSQL connection lost): every request reads "
                        "its source from the database until they are back")
            self._reconnecting = asyncio.create_task(self._reconnect())

    async def _listen(self) -> bool:
        try:
            conn = await connect_one(self._dsn, self._schema)
        except Exception as e:  # noqa: BLE001 - any failure: read the database each request, try again later
            log.debug("cannot listen for source changes yet: %s", e)
            return False
        try:
            await conn.add_listener(CHANNEL, self._changed)
        except Exception:  # noqa: BLE001
            with contextlib.suppress(Exception):
                await conn.close()
            return False
        conn.add_termination_listener(self._lost)
        self._forget()  # what changed while nobody listened
        self._listener = conn
        return True

    async def _reconnect(self) -> None:
        while not self._closed and not await self._listen():
            await asyncio.sleep(self._reconnect_s)
        if self._listener is not None:
            log.warning("the sources' change notifications are back")

    async def close(self) -> None:
        self._closed = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnecting
        conn, self._listener = self._listener, None
        self._forget()
        if conn is not None:
            conn.remove_termination_listener(self._lost)
            with contextlib.suppress(Exception):
                await conn.close()
