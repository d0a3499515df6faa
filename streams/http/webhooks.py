"""Webhook endpoints over the HTTP API (docs/http.md "Webhooks"): what ``runledger webhooks`` does, for a source.

``POST /v1/webhooks`` adds an endpoint (its signing secret answered once), ``GET /v1/webhooks`` lists the caller's,
``GET /v1/webhooks/{id}`` shows one, ``POST /v1/webhooks/{id}/rotate-secret``, ``/disable``, ``/enable`` and
``/ping``, ``DELETE /v1/webhooks/{id}`` removes one. A source sees and manages only the endpoints it added (another's
is answered 404, as one that does not exist), and subscribes only to what it may read: the endpoint's stream prefix
must start with one of its read prefixes (403 ``outside_read_scope`` otherwise), and the delivery worker delivers an
endpoint a source added only what that source may still read, while it is not revoked.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from runledger.projections.postgres.queries import query
from runledger.schemas.events import EVENT_TYPES
from runledger.streams.http.auth import caller
from runledger.streams.http.caller import Caller
from runledger.streams.http.documents import problem_responses
from runledger.streams.http.keys import load_key
from runledger.streams.http.problems import Problem
from runledger.streams.http.services import Services, reading, services
from runledger.streams.webhooks import endpoints
from runledger.streams.webhooks.endpoints import EndpointNotFound, Filter
from runledger.streams.webhooks.ping import ping as send_ping
from runledger.streams.webhooks.targets import TargetRefused

__all__ = ["router"]

router = APIRouter(tags=["webhooks"])

_REASONS = {400: "The body is not JSON", 401: "No valid signature",
            403: "The streams are outside the caller's read scope",
            404: "No endpoint of that id is the caller's", 409: "An endpoint of that id exists already",
            422: "A field is invalid, or the URL refused (each named)",
            503: "PostgreSQL is unavailable (Retry-After)"}


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return problem_responses(_REASONS, *statuses)


EndpointId = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="the endpoint's id")]


class NewEndpoint(BaseModel):
    """An endpoint to add: where, and which events (``types``: none, every type; ``streams``: a stream-id prefix
    within the caller's read prefixes; ``source``: a CloudEvents source, none: any)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2000, examples=["https://billing.example/hooks/runledger"])
    types: list[str] = Field(default_factory=list, max_length=len(EVENT_TYPES), examples=[["execution.failed"]])
    streams: str = Field("", max_length=200, description="only streams whose id starts with this")
    source: str | None = Field(None, min_length=1, max_length=1000)
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                           description="the endpoint's id (default: wh_ and 16 hex digits)")


class Rotation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overlap_s: float = Field(86_400.0, ge=0, le=30 * 86_400,
                             description="how long the secrets in use stay valid (0: they end now)")


class Disabling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("disabled by its source", min_length=1, max_length=500)


class Secret(BaseModel):
    """A signing secret, answered only when it is made: keep it, it is not shown again."""

    endpoint_id: str
    secret_no: int
    secret: str = Field(description="the Standard Webhooks whsec_ secret the deliveries are signed with")


class SecretDates(BaseModel):
    secret_no: int
    created_at: datetime
    expires_at: datetime | None = None


class Endpoint(BaseModel):
    """An endpoint, its filter and state, and its secrets' dates (never a secret)."""

    endpoint_id: str
    url: str
    types: list[str]
    stream_prefix: str
    source: str | None = None
    enabled: bool
    disabled_reason: str | None = None
    disabled_at: datetime | None = None
    failing_since: datetime | None = None
    created_at: datetime
    secrets: list[SecretDates]


class Endpoints(BaseModel):
    endpoints: list[Endpoint]


class PingAnswer(BaseModel):
    """What the endpoint answered a signed ``runledger.webhook.ping``."""

    webhook_id: str
    ok: bool
    status: int | None = None
    seconds: float
    address: str | None = None
    response: str = Field(description="the first KiB of the answer's body")
    error: str | None = None


@contextlib.asynccontextmanager
async def _conn(svc: Services, what: str, endpoint_id: str | None = None, *,
                write: bool = True) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the pool (``reads.reading``: PostgreSQL unavailable, 503), in a transaction that may write
    (``write``: serve's login is read-only by default; its privileges bound what it may write: the endpoints and
    their secrets); the endpoint gone meanwhile: 404."""
    try:
        async with reading(svc, what) as conn:
            if not write:
                yield conn
                return
            async with conn.transaction():
                await conn.execute("SET TRANSACTION READ WRITE")
                yield conn
    except EndpointNotFound as e:
        raise _not_found(endpoint_id or "") from e


def _not_found(endpoint_id: str) -> Problem:
    return Problem(404, "webhook_not_found", f"no webhook endpoint {endpoint_id!r} of this source")


async def _own(conn: asyncpg.Connection, who: Caller, endpoint_id: str) -> dict[str, Any]:
    """The caller's endpoint ``endpoint_id``, or 404 (another source's, removed, or none)."""
    owner = await conn.fetchval(query("webhook_owner"), endpoint_id)
    if owner != who.source_id:
        raise _not_found(endpoint_id)
    [found] = await endpoints.list_endpoints(conn, endpoint_id)
    return found


def _within_scope(who: Caller, prefix: str) -> None:
    if not any(prefix.startswith(p) for p in who.read_prefixes):
        raise Problem(403, "outside_read_scope", f"streams {prefix!r}: an endpoint is delivered only what its source "
                      f"may read; this source reads streams starting with {list(who.read_prefixes) or 'nothing'}")


@router.post("/v1/webhooks", status_code=201, response_model=Secret, responses=_problems(400, 403, 409),
             summary="Add a webhook endpoint; its signing secret is answered once")
async def add(body: NewEndpoint, who: Annotated[Caller, Depends(caller)],
              svc: Annotated[Services, Depends(services)]) -> Secret:
    """An endpoint owed every event matching the filter that reaches the log from now on, within the caller's read
    scope. The URL is https to a public address (unless the server allows private ones); refused: 422 naming it."""
    try:
        flt = Filter(tuple(sorted(set(body.types))), body.streams, body.source)
    except ValueError as e:
        raise Problem(422, "invalid_filter", str(e).replace("--types", "types").replace("--streams", "streams")
                      .replace("--source", "source")) from e
    _within_scope(who, flt.stream_prefix)
    async with _conn(svc, "add a webhook endpoint") as conn:
        try:
            added = await endpoints.add_endpoint(conn, load_key(svc.settings), body.url, flt,
                                                 allow_private=svc.settings.webhook_allow_private,
                                                 endpoint_id=body.id, owner_source=who.source_id)
        except TargetRefused as e:
            raise Problem(422, "url_refused", f"url: {e}") from e
        except ValueError as e:
            if "exists already" in str(e):
                raise Problem(409, "webhook_exists", str(e)) from e
            raise Problem(422, "invalid_id", str(e)) from e
    return Secret(endpoint_id=added["endpoint_id"], secret_no=added["secret_no"], secret=added["secret"])


@router.get("/v1/webhooks", response_model=Endpoints, summary="The caller's webhook endpoints")
async def list_own(who: Annotated[Caller, Depends(caller)], svc: Annotated[Services, Depends(services)]
                   ) -> Endpoints:
    async with _conn(svc, "list webhook endpoints", write=False) as conn:
        owned = {r["endpoint_id"] for r in await conn.fetch(query("webhook_owned"), who.source_id)}
        found = [e for e in await endpoints.list_endpoints(conn) if e["endpoint_id"] in owned]
    return Endpoints(endpoints=[Endpoint(**e) for e in found])


@router.get("/v1/webhooks/{endpoint_id}", response_model=Endpoint, responses=_problems(404),
            summary="One of the caller's webhook endpoints")
async def show(endpoint_id: EndpointId, who: Annotated[Caller, Depends(caller)],
               svc: Annotated[Services, Depends(services)]) -> Endpoint:
    async with _conn(svc, "read a webhook endpoint", endpoint_id, write=False) as conn:
        return Endpoint(**await _own(conn, who, endpoint_id))


@router.post("/v1/webhooks/{endpoint_id}/rotate-secret", response_model=Secret, responses=_problems(400, 404),
             summary="A new signing secret, answered once; the ones in use stay valid through the overlap")
async def rotate(endpoint_id: EndpointId, body: Rotation, who: Annotated[Caller, Depends(caller)],
                 svc: Annotated[Services, Depends(services)]) -> Secret:
    async with _conn(svc, "rotate a webhook secret", endpoint_id) as conn:
        await _own(conn, who, endpoint_id)
        rotated = await endpoints.rotate_secret(conn, load_key(svc.settings), endpoint_id, body.overlap_s)
    return Secret(**rotated)


@router.post("/v1/webhooks/{endpoint_id}/disable", response_model=Endpoint, responses=_problems(400, 404),
             summary="Stop delivering to an endpoint (what matches meanwhile waits for enable)")
async def disable(endpoint_id: EndpointId, body: Disabling, who: Annotated[Caller, Depends(caller)],
                  svc: Annotated[Services, Depends(services)]) -> Endpoint:
    async with _conn(svc, "disable a webhook endpoint", endpoint_id) as conn:
        await _own(conn, who, endpoint_id)
        await endpoints.set_enabled(conn, endpoint_id, False, body.reason)
        return Endpoint(**(await endpoints.list_endpoints(conn, endpoint_id))[0])


@router.post("/v1/webhooks/{endpoint_id}/enable", response_model=Endpoint, responses=_problems(404),
             summary="Deliver to an endpoint again, what it missed first, in order")
async def enable(endpoint_id: EndpointId, who: Annotated[Caller, Depends(caller)],
                 svc: Annotated[Services, Depends(services)]) -> Endpoint:
    async with _conn(svc, "enable a webhook endpoint", endpoint_id) as conn:
        await _own(conn, who, endpoint_id)
        await endpoints.set_enabled(conn, endpoint_id, True)
        return Endpoint(**(await endpoints.list_endpoints(conn, endpoint_id))[0])


@router.delete("/v1/webhooks/{endpoint_id}", status_code=204, response_class=Response, responses=_problems(404),
               summary="Remove an endpoint for good (its deliveries' history stays)")
async def remove(endpoint_id: EndpointId, who: Annotated[Caller, Depends(caller)],
                 svc: Annotated[Services, Depends(services)]) -> Response:
    async with _conn(svc, "remove a webhook endpoint", endpoint_id) as conn:
        await _own(conn, who, endpoint_id)
        await endpoints.remove_endpoint(conn, endpoint_id)
    return Response(status_code=204)


@router.post("/v1/webhooks/{endpoint_id}/ping", response_model=PingAnswer, responses=_problems(404),
             summary="POST a signed runledger.webhook.ping to the endpoint now, and answer what it answered")
async def ping_endpoint(endpoint_id: EndpointId, who: Annotated[Caller, Depends(caller)],
               svc: Annotated[Services, Depends(services)]) -> PingAnswer:
    async with _conn(svc, "ping a webhook endpoint", endpoint_id, write=False) as conn:
        await _own(conn, who, endpoint_id)
        url, secrets = await endpoints.delivery_secrets(conn, load_key(svc.settings), endpoint_id)
    try:
        answer = await send_ping(endpoint_id, url, secrets, svc.settings, timeout_s=svc.settings.webhook_timeout_s)
    except TargetRefused as e:
        raise Problem(422, "url_refused", f"url: {e}") from e
    return PingAnswer(**answer)
