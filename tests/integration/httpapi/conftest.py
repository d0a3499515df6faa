"""An app with the ingest routes on the embedded stack, its caller set by the test (signatures: test_auth.py,
test_refusals.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from runledger.projections.postgres.db import connect, migrate
from runledger.streams.http import ingest as ingest_routes
from runledger.streams.http.caller import Caller
from runledger.streams.http.problems import Problem, problem_response
from runledger.streams.http.services import Services
from runledger.streams.producer.client import EventProducer
from runledger.streams.settings import Settings
from tests.integration.conftest import read_log, settings_of

PRODUCER = Caller("billing", "/producers/billing", append_prefixes=("bill-",), read_prefixes=("bill-",))


@dataclass
class Ingest:
    """The app, a client of it, the caller its requests come from (change ``who`` to be another), the settings."""

    client: httpx.AsyncClient
    settings: Settings
    env: dict[str, str]
    who: list[Caller] = field(default_factory=lambda: [PRODUCER])

    async def log(self) -> list[dict[str, Any]]:
        """Every event in the log, in log order."""
        return [orjson.loads(r.value) for r in await read_log(self.settings)]

    async def post(self, path: str, body: Any = None, *, webhook_id: str | None = None, content: bytes | None = None,
                   headers: dict[str, str] | None = None, **params: Any) -> httpx.Response:
        sent = {"content-type": "application/json", **({"webhook-id": webhook_id} if webhook_id else {}),
                **(headers or {})}
        return await self.client.post(path, content=content if content is not None else orjson.dumps(body),
                                      headers=sent, params=params)


@pytest.fixture
async def ingest(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Ingest]:
    schema = f"h_{uuid.uuid4().hex[:12]}"
    env = {**env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}",
           "RUNLEDGER_PRODUCER_WAIT_S": "5"}
    settings = settings_of(env)
    await migrate(settings.database_url, schema)
    redis = Redis.from_url(settings.redis_dsn)
    pool = await connect(settings.database_dsn("producer"), schema)
    async with EventProducer(settings) as producer:
        app = FastAPI()
        app.include_router(ingest_routes.router)
        app.add_exception_handler(Problem, problem_response)
        app.state.services = Services(settings, producer, pool, redis)
        holder = Ingest(httpx.AsyncClient(), settings, env)

        async def who(_: Any) -> Caller:
            return holder.who[0]

        monkeypatch.setattr(ingest_routes, "authenticate", who)  # the routes authenticate the request themselves
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as client:
            holder.client = client
            yield holder
    await pool.close()
    await redis.aclose()
