"""What a ``serve`` process holds while it runs, shared by its routes: the producer, a PostgreSQL pool, Redis."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis
from starlette.requests import Request

from runledger.projections.postgres.db import database_error
from runledger.schemas.errors import TransientError
from runledger.streams.http.problems import Problem
from runledger.streams.producer.client import EventProducer
from runledger.streams.settings import Settings

__all__ = ["ProducerNotStarted", "Services", "reading", "services"]


class ProducerNotStarted(TransientError):
    """``serve`` started while Kafka or Redis was unavailable and has not reached them yet: answered 503."""

    code = "unavailable"


@dataclass(slots=True)
class Services:
    """Made by the app's lifespan (``runledger.streams.http.app``) and kept in ``app.state.services``.

    ``started_producer`` is None until the producer has reached Kafka and Redis (``serve`` starts without them and
    keeps trying: ``not_started`` says why it has not yet); ``producer`` raises ProducerNotStarted (503) until
    then."""

    settings: Settings
    started_producer: EventProducer | None
    pool: asyncpg.Pool
    redis: Redis
    not_started: str | None = None
    kafka_down: str | None = None
    """Why Kafka did not answer the last probe (``app.py`` probes it every second), or None: while it is set, an
    append is refused with 503 before anything is staged."""

    @property
    def producer(self) -> EventProducer:
        if self.started_producer is None:
            raise ProducerNotStarted(f"not connected to Kafka and Redis yet ({self.not_started or 'starting'})")
        if self.kafka_down is not None:
            raise ProducerNotStarted(f"Kafka is unavailable ({self.kafka_down}); nothing was appended")
        return self.started_producer


async def services(request: Request) -> Services:
    """The FastAPI dependency that hands a route the process's services (async: a plain function would run in
    the thread pool, a thread hop per request)."""
    held: Services = request.app.state.services
    return held


@contextlib.asynccontextmanager
async def reading(svc: Services, what: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the pool; PostgreSQL unavailable, slow or refusing the login: a 503 with Retry-After."""
    try:
        async with svc.pool.acquire(timeout=5) as conn:
            yield conn
    except Problem:
        raise
    except Exception as e:
        error = database_error(e, what)
        if isinstance(error, TransientError):
            raise Problem(503, "database_unavailable", f"{what}: PostgreSQL is unavailable; try again",
                          headers={"Retry-After": "5"}) from e
        raise
