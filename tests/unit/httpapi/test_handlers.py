"""Every error as a problem document: validation (422 naming each field), a dependency unavailable (503 with
Retry-After), anything unexpected (500, logged), Starlette's own refusals (404, 405)."""

from __future__ import annotations

from typing import Annotated

import asyncpg
import httpx
import pytest
from fastapi import FastAPI, Query
from redis.exceptions import ConnectionError as RedisConnectionError

from runledger.projections.postgres.db import StoreUnavailable
from runledger.streams.http.app import install_handlers


def app_with_errors() -> FastAPI:
    app = FastAPI()
    install_handlers(app)

    @app.get("/typed")
    async def typed(limit: Annotated[int, Query(ge=1)], since: Annotated[int, Query()]) -> dict[str, int]:
        return {"limit": limit}

    @app.get("/store")
    async def store() -> None:
        raise StoreUnavailable("PostgreSQL at 127.0.0.1:1 refused the connection")

    @app.get("/redis")
    async def redis() -> None:
        raise RedisConnectionError("Redis went away")

    @app.get("/shutting-down")
    async def shutting_down() -> None:
        raise asyncpg.CannotConnectNowError("the database system is shutting down")

    @app.get("/admin-shutdown")
    async def admin_shutdown() -> None:
        raise asyncpg.AdminShutdownError("terminating connection due to administrator command")

    @app.get("/bug")
    async def bug() -> None:
        raise ZeroDivisionError("a bug")

    return app


async def test_each_error_is_a_problem(caplog: pytest.LogCaptureFixture) -> None:
    transport = httpx.ASGITransport(app_with_errors(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        invalid = await client.get("/typed", params={"limit": "0"})
        assert invalid.status_code == 422 and invalid.headers["content-type"] == "application/problem+json"
        assert {e["field"] for e in invalid.json()["errors"]} == {"query.limit", "query.since"}
        for path in ("/store", "/redis", "/shutting-down", "/admin-shutdown"):
            down = await client.get(path)
            assert down.status_code == 503 and down.headers["Retry-After"] == "2", path
            assert down.json()["code"] == "unavailable"
        with caplog.at_level("ERROR"):
            failed = await client.get("/bug")
        assert failed.status_code == 500 and failed.json()["code"] == "internal_error"
        assert "a bug" not in failed.text and any(r.exc_info for r in caplog.records)
        assert (await client.get("/nowhere")).json()["code"] == "not_found"
        assert (await client.post("/typed")).json()["code"] == "method_not_allowed"
