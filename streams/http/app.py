"""``create_app(settings)``: the FastAPI application ``runledger serve`` runs on uvicorn.

Its lifespan starts what the routes share (``Services``): the ``EventProducer`` (Kafka and the Redis-held heads), a
PostgreSQL pool logged in as ``runledger_api`` (reads the projection, the proofs and the sources; writes nothing),
a Redis client for the rate limits, and the sources key. It serves this process's Prometheus metrics on
RUNLEDGER_METRICS_PORT (the next free port if taken, as a worker does; 0: none), apart from the API, so that they
need no signature and are never exposed with it.

Every error is a problem document (``problems.py``): a ``Problem`` as raised; FastAPI's validation errors as 422
naming each field; a TransientError (Kafka, Redis or PostgreSQL unavailable) as 503 with ``Retry-After``; anything
else as 500, logged. A request body longer than RUNLEDGER_HTTP_MAX_BODY_BYTES is refused with 413 from its
Content-Length, or once that many bytes have arrived, before it is read whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import asyncpg
from aiokafka.errors import KafkaError
from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runledger.projections.postgres.db import connect, database_error
from runledger.schemas.errors import TransientError
from runledger.streams import metrics
from runledger.streams.http import ingest, reads, webhooks
from runledger.streams.http.auth import caller
from runledger.streams.http.caller import Caller
from runledger.streams.http.keys import load_key
from runledger.streams.http.problems import Problem, problem_response
from runledger.streams.http.services import Services
from runledger.streams.http.sourcecache import SourceCache
from runledger.streams.producer.client import EventProducer
from runledger.streams.settings import Settings

__all__ = ["BodyLimit", "BodyTooLarge", "app_from_env", "create_app", "install_handlers"]

log = logging.getLogger(__name__)

RETRY_AFTER_S = 2
"""The ``Retry-After`` of a 503 when a dependency is unavailable: a producer's retries then reach a replica or a
dependency that is back soon, without a storm."""


class BodyTooLarge(HTTPException):
    """Raised while a body is read, once it passes the limit: an HTTPException, so that FastAPI's body parsing lets
    it through (it turns other errors into a 400); answered as a 413 problem."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds {limit} bytes (RUNLEDGER_HTTP_MAX_BODY_BYTES): send fewer "
                         "events per request")


_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 406: "not_acceptable",
               413: "body_too_large", 415: "unsupported_media_type"}


class BodyLimit:
    """Refuses a request body longer than ``limit`` bytes with 413 before it is read whole: at once from its
    Content-Length, else (chunked) as soon as the bytes received pass the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            problem = None
            if not length.isdigit():
                problem = Problem(400, "bad_content_length", "Content-Length must be a whole number of bytes")
            elif int(length) > self.limit:
                problem = Problem(413, "body_too_large", BodyTooLarge(self.limit).detail, title="request too large")
            if problem is not None:
                response = await _problem(Request(scope), problem)
                await response(scope, receive, send)
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


class Metrics:
    """Counts each request by route template, method and status, and times it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            metrics.HTTP_REQUESTS.labels(route, scope["method"], str(status)).inc()
            metrics.HTTP_SECONDS.labels(route).observe(time.perf_counter() - started)


async def _problem(request: Request, exc: Exception) -> Response:
    """``problem_response``, the refusal counted by its code."""
    assert isinstance(exc, Problem)
    metrics.HTTP_REFUSALS.labels(exc.code).inc()
    return await problem_response(request, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's and FastAPI's own refusals (404, 405, a body too large or unparsable) as problems."""
    assert isinstance(exc, HTTPException)
    return await _problem(request, Problem(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"),
                                           str(exc.detail), headers=exc.headers))


async def _invalid_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [{"field": ".".join(str(part) for part in e.get("loc", ())), "reason": str(e.get("msg", "invalid"))}
              for e in exc.errors()]
    names = ", ".join(e["field"] for e in errors)
    return await _problem(request, Problem(422, "invalid_request", f"invalid request: {names}", errors=errors))


async def _unavailable(request: Request, exc: Exception) -> Response:
    """A dependency is unavailable (TransientError, or a driver's error no layer translated): 503, Retry-After."""
    error = exc if isinstance(exc, TransientError) else database_error(exc, "PostgreSQL") or exc
    log.warning("%s %s: 503: %s", request.method, request.url.path, error)
    return await _problem(request, Problem(503, "unavailable", f"a service runledger needs is unavailable, try "
                                           f"again: {error}", title="service unavailable",
                                           headers={"Retry-After": str(RETRY_AFTER_S)}))


async def _unexpected(request: Request, exc: Exception) -> Response:
    translated = database_error(exc, "PostgreSQL")  # a server shutting down (57P01, 57P03), out of resources…
    if isinstance(translated, TransientError):
        return await _unavailable(request, translated)
    log.error("%s %s: unexpected error", request.method, request.url.path, exc_info=exc)
    return await _problem(request, Problem(500, "internal_error", "the server failed; it is logged",
                                           title="internal server error"))


class WhoAmI(BaseModel):
    """The source a request's signature belongs to, and what it may do."""

    source_id: str
    source: str
    append_prefixes: list[str]
    read_prefixes: list[str]
    rate_per_s: float | None
    burst: int | None


async def _whoami(who: Annotated[Caller, Depends(caller)]) -> WhoAmI:
    return WhoAmI(source_id=who.source_id, source=who.source, append_prefixes=list(who.append_prefixes),
                  read_prefixes=list(who.read_prefixes), rate_per_s=who.rate_per_s, burst=who.burst)


async def _healthz() -> dict[str, str]:
    return {"status": "up"}


async def _readyz(request: Request) -> dict[str, Any]:
    svc: Services = request.app.state.services
    if svc.started_producer is None:  # serve started without Kafka or Redis: not connected to them yet
        why = f"not connected yet: {svc.not_started or 'starting'}"
        checks: dict[str, str | None] = {"kafka": why, "redis": why}
    else:
        checks = await svc.started_producer.ready()
    try:
        await asyncio.wait_for(svc.pool.fetchval("SELECT 1"), 2.0)
        checks["postgres"] = None
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TransientError) as e:
        checks["postgres"] = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    failing = {name: why for name, why in checks.items() if why}
    if failing:
        raise Problem(503, "not_ready", f"unavailable: {', '.join(sorted(failing))}", title="not ready",
                      errors=[{"field": name, "reason": why} for name, why in sorted(failing.items())],
                      headers={"Retry-After": str(RETRY_AFTER_S)})
    return {"status": "ready", "checks": {name: "ok" for name in sorted(checks)}}


_PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}


def install_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` as a problem document (the module's docstring says which status for what);
    for a test's own app too."""
    app.add_exception_handler(Problem, _problem)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    for unavailable in (TransientError, RedisError, KafkaError, asyncpg.PostgresConnectionError,
                        asyncpg.InterfaceError, ConnectionError):
        app.add_exception_handler(unavailable, _unavailable)
    app.add_exception_handler(Exception, _unexpected)


async def _try_producer(svc: Services) -> bool:
    """Start the producer once: True if it reached Kafka and Redis (then in ``svc.started_producer``)."""
    producer = EventProducer(svc.settings)
    try:
        await producer.start()
    except (TransientError, KafkaError, RedisError, OSError) as e:
        with contextlib.suppress(Exception):
            await producer.stop()
        if svc.not_started is None:
            log.warning("cannot start the producer (%s): appends and /readyz are answered 503 until Kafka and Redis "
                        "are reached; trying again every %g s", e, svc.settings.http_start_retry_s)
        svc.not_started = str(e) or type(e).__name__
        return False
    svc.started_producer, svc.not_started = producer, None
    return True


async def _start_producer(svc: Services) -> None:
    """Start the producer, again every RUNLEDGER_HTTP_START_RETRY_S seconds while Kafka or Redis is unavailable:
    ``serve`` answers meanwhile (appends and /readyz with 503, reads if PostgreSQL is up)."""
    if svc.started_producer is None:
        while not await _try_producer(svc):
            await asyncio.sleep(svc.settings.http_start_retry_s)
        log.warning("producer started: Kafka and Redis reached")
    await _probe_kafka(svc)


KAFKA_PROBE_S = 1.0


async def _probe_kafka(svc: Services) -> None:
    """Ask Kafka for its metadata every KAFKA_PROBE_S seconds; while it does not answer, ``svc.kafka_down`` says
    why and appends are refused (503) before anything is staged: an append staged while Kafka is down would be
    published once it is back, whatever its request was answered."""
    assert svc.started_producer is not None
    while True:
        why = (await svc.started_producer.ready(timeout=KAFKA_PROBE_S)).get("kafka")
        if why != svc.kafka_down:
            log.warning("Kafka %s", f"unavailable: appends are answered 503 ({why})" if why else "is back")
        svc.kafka_down = why
        await asyncio.sleep(KAFKA_PROBE_S)


def create_app(settings: Settings) -> FastAPI:
    """The application; nothing is connected until its lifespan starts (uvicorn's startup)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = Redis.from_url(settings.redis_dsn, socket_timeout=5.0, socket_connect_timeout=2.0)
        pool, starting, sources = None, None, None
        try:
            pool = await connect(settings.database_dsn("api"), settings.db_schema, min_size=0, max_size=10,
                                 advisory_locks=False)
            sources = app.state.sources = SourceCache(pool, load_key(settings), settings.database_dsn("api"),
                                                      settings.db_schema)
            await sources.start()
            svc = app.state.services = Services(settings, None, pool, redis)
            await _try_producer(svc)  # serve starts all the same without Kafka or Redis, and keeps trying
            starting = asyncio.create_task(_start_producer(svc))
            if settings.metrics_port:
                port = metrics.serve(settings.metrics_host, settings.metrics_port)
                log.warning("metrics on http://%s:%d/metrics", settings.metrics_host, port)
            # What start-up made (the app, its routes and models, the libraries) lives as long as the process: out
            # of the collector's sight, so that a full collection scans only what requests made. Measured: 35-42 ms
            # pauses, four in 9 s at 500 requests/s, became 2 ms.
            gc.collect()
            gc.freeze()
            yield
        finally:
            if starting is not None:
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
            if sources is not None:
                await sources.close()
            if pool is not None:
                await pool.close()
            with contextlib.suppress(RedisError):
                await redis.aclose()
            held = getattr(app.state, "services", None)
            if held is not None and held.started_producer is not None:
                await held.started_producer.stop()

    app = FastAPI(
        title="runledger", version="1", lifespan=lifespan, openapi_url="/openapi.json", docs_url=None,
        redoc_url=None,
        description="runledger's HTTP front door: signed appends of CloudEvents to hash-chained streams, and reads "
        "of executions and proofs. Every /v1 request is signed per Standard Webhooks (docs/http.md, "
        "Authentication); every error is an RFC 9457 problem document.")
    app.add_middleware(BodyLimit, limit=settings.http_max_body_bytes)
    app.add_middleware(Metrics)
    install_handlers(app)
    app.add_api_route("/healthz", _healthz, methods=["GET"], tags=["operations"],
                      summary="the process is up (no dependency checked)")
    app.add_api_route("/readyz", _readyz, methods=["GET"], tags=["operations"],
                      summary="Kafka, Redis and PostgreSQL each answer; 503 naming those that do not",
                      responses={503: _PROBLEM})
    app.add_api_route("/v1/whoami", _whoami, methods=["GET"], response_model=WhoAmI, tags=["authentication"],
                      summary="the source this request's signature belongs to: check a producer's credentials",
                      responses={401: _PROBLEM, 503: _PROBLEM})
    app.include_router(ingest.router)
    app.include_router(reads.router)
    app.include_router(webhooks.router)
    return app


def app_from_env() -> FastAPI:
    """``create_app`` with the settings of the environment: uvicorn's factory (``runledger serve``)."""
    return create_app(Settings())
