"""What a ``serve`` process holds while it runs, shared by its routes: the producer, a PostgreSQL pool, Redis."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis
from starlette.requests import Request

from runledger.streams.producer.client import EventProducer
from runledger.streams.settings import Settings

__all__ = ["Services", "services"]


@dataclass(frozen=True, slots=True)
class Services:
    """Made by the app's lifespan (``runledger.streams.http.app``) and kept in ``app.state.services``."""

    settings: Settings
    producer: EventProducer
    pool: asyncpg.Pool
    redis: Redis


def services(request: Request) -> Services:
    """The FastAPI dependency that hands a route the process's services."""
    held: Services = request.app.state.services
    return held
