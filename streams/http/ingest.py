"""Appends over HTTP: ``POST /v1/streams/{stream}/events`` (the simple body ``runledger produce`` reads) and
``POST /v1/events`` (the CloudEvents HTTP binding), both through ``EventProducer``, all or nothing
(docs/http.md, "Appending" and "CloudEvents")."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from runledger.schemas.errors import IllegalTransition, InvalidEvent, PermanentError, TooLarge, TransientError
from runledger.schemas.events import STREAM_ID_PATTERN
from runledger.streams import metrics
from runledger.streams.http.auth import SIGNED, authenticate
from runledger.streams.http.bodies import (
    CE_BATCH,
    CE_STRUCTURED,
    MAX_BATCH,
    CloudEvents,
    cloudevents,
    media_type,
    simple_events,
)
from runledger.streams.http.caller import Caller
from runledger.streams.http.problems import Problem
from runledger.streams.http.ratelimit import admission, refused_over_limit
from runledger.streams.http.services import Services
from runledger.streams.producer.client import AppendConflict, Appended, ChainConflict, PublishPending, PublishRefused

__all__ = ["RETRY_AFTER_S", "router", "webhook_id"]

router = APIRouter(tags=["append"])

RETRY_AFTER_S = 1
"""The ``Retry-After`` of a 503: Kafka, Redis or PostgreSQL unavailable, or the stream's lease busy."""

MAX_WAIT_S = 60.0


def webhook_id(request: Request) -> str | None:
    """The request's ``webhook-id`` (Standard Webhooks): its idempotency key. Set by the authentication in
    ``request.state`` once verified; read from the header where it is not."""
    held = getattr(request.state, "webhook_id", None)
    return held if isinstance(held, str) else request.headers.get("webhook-id")


class AppendedEvent(BaseModel):
    id: str
    seq: int
    hash: str
    duplicate: bool


class WaitOutcome(BaseModel):
    status: str  # projected, rejected, stalled, timeout, unavailable
    reason: str | None = None
    error: str | None = None
    head_seq: int | None = None
    waited_s: float | None = None


class AppendResult(BaseModel):
    stream: str
    events: list[AppendedEvent]
    pending: bool | None = None
    projected: bool | None = None
    wait: WaitOutcome | None = None


_PROBLEM = {"content": {"application/problem+json": {"schema": {"type": "object"}}}}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"model": AppendResult, "description": "the events are staged with these ids, seqs and hashes, but Kafka "
          "did not acknowledge them in time (it became unavailable): they will be in the log, published once it is "
          "back (pending: true); retrying with the same webhook-id answers 200 once they are"},
    200: {"model": AppendResult, "description": "every event was appended before (a retried request): their ids, "
          "seqs and hashes"},
    400: {**_PROBLEM, "description": "not JSON, or not an object or array"},
    403: {**_PROBLEM, "description": "outside the source's grant, or an event of another source"},
    409: {**_PROBLEM, "description": "expected_seq, or a chained event's seq/prevhash, does not match the stream's "
          "head; or the stream's lifecycle refuses an event"},
    413: {**_PROBLEM, "description": "an event over 512 KiB, or over 1,000 events"},
    415: {**_PROBLEM, "description": "a Content-Type the route does not take"},
    422: {**_PROBLEM, "description": "an invalid event: every failed field named, with its event's index"},
    429: {**_PROBLEM, "description": "over the source's rate limit: retry after Retry-After seconds; nothing was "
          "appended"},
    503: {**_PROBLEM, "description": "Kafka, Redis or PostgreSQL unavailable: retry after Retry-After seconds with "
          "the same webhook-id"},
}
_EVENT_SCHEMA = {"type": "object", "required": ["type", "data"], "additionalProperties": False,
                 "properties": {"type": {"type": "string"}, "data": {"type": "object"},
                                "time": {"type": "string", "format": "date-time"},
                                "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 200}}}
_CLOUDEVENT_SCHEMA = {"type": "object", "required": ["specversion", "type", "subject", "data"],
                      "properties": {"specversion": {"const": "1.0"}, "id": {"type": "string"},
                                     "source": {"type": "string"}, "type": {"type": "string"},
                                     "subject": {"type": "string"}, "time": {"type": "string"},
                                     "datacontenttype": {"const": "application/json"}, "data": {"type": "object"},
                                     "seq": {"type": "integer"}, "prevhash": {"type": "string"},
                                     "hash": {"type": "string"}}}


def _problem(e: Exception) -> Problem:
    """What the producer raised, as the problem the client gets."""
    if isinstance(e, Problem):
        return e
    if isinstance(e, AppendConflict):
        return Problem(409, "append_conflict", f"{e}; nothing was appended: read the stream, decide again and "
                       "append with the new expected_seq", extra={"stream": e.stream_id,
                                                                  "expected_seq": e.expected, "seq": e.actual})
    if isinstance(e, ChainConflict):
        return Problem(409, "chain_conflict", f"{e}; nothing was appended", extra={
            "stream": e.stream_id, "seq": e.head.seq, "hash": e.head.hash})
    if isinstance(e, IllegalTransition):
        return Problem(409, "illegal_transition", f"{e}; nothing was appended")
    if isinstance(e, TooLarge):
        return Problem(413, "too_large", f"{e}; nothing was appended", errors=[
            {"field": f, "reason": r} for f, r in e.errors])
    if isinstance(e, InvalidEvent):
        return Problem(422, e.code, f"{e}; nothing was appended", errors=[
            {"field": f, "reason": r} for f, r in e.errors])
    if isinstance(e, PublishRefused):
        return Problem(502, "publish_refused", str(e))
    if isinstance(e, TransientError):
        return Problem(503, e.code, f"{e}; retry after {RETRY_AFTER_S} s with the same webhook-id: nothing is "
                       "appended twice", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, PermanentError):
        return Problem(422, e.code, f"{e}; nothing was appended")
    raise e


def _outcome(status: int) -> str:
    return "refused" if status < 500 else "unavailable" if status == 503 else "failed"


async def _appending(mode: str, append: Callable[[], Awaitable[tuple[str, list[Appended]]]]
                     ) -> tuple[str, list[Appended], bool]:
    """Run ``append``, counting the request by ``mode`` and outcome; what it raises becomes a ``Problem``."""
    try:
        stream, out = await append()
    except PublishPending as e:  # staged: it will be in the log; answered 202, never "failed"
        metrics.HTTP_APPENDS.labels(mode, "pending").inc()
        return e.appended[0].stream_id if e.appended else "", e.appended, True
    except Exception as e:
        problem = _problem(e)
        metrics.HTTP_APPENDS.labels(mode, _outcome(problem.status)).inc()
        raise problem from e
    duplicates = sum(a.duplicate for a in out)
    metrics.HTTP_APPENDS.labels(mode, "duplicate" if duplicates == len(out) else "appended").inc()
    metrics.HTTP_APPENDED_EVENTS.labels(mode, "appended").inc(len(out) - duplicates)
    metrics.HTTP_APPENDED_EVENTS.labels(mode, "duplicate").inc(duplicates)
    return stream, out, False


async def _answer(svc: Services, stream: str, out: list[Appended], wait: str | None, timeout: float, *,
                  pending: bool = False) -> Response:
    """201 (200: every event a duplicate) with each event's id, seq and hash; with ``wait``, whether the last one is
    projected: the events are appended whatever the wait's outcome."""
    body: dict[str, Any] = {"stream": stream, "events": [
        {"id": a.id, "seq": a.seq, "hash": a.hash, "duplicate": a.duplicate} for a in out]}
    if pending:  # staged, not acknowledged by Kafka yet: nothing to wait for now
        body["pending"] = True
        return Response(orjson.dumps(body), status_code=202, media_type="application/json")
    if wait == "projected" and out:
        last = max(out, key=lambda a: a.seq)
        try:
            result = await svc.producer.wait_projected(last, timeout=timeout)
            body["wait"] = {"status": result.status, "reason": result.reason, "error": result.error,
                            "head_seq": result.head_seq, "waited_s": round(result.waited_s, 3)}
        except TransientError as e:  # PostgreSQL unavailable: the events are appended all the same
            body["wait"] = {"status": "unavailable", "reason": e.code, "error": str(e)}
        body["projected"] = body["wait"]["status"] == "projected"
    status = 200 if all(a.duplicate for a in out) else 201
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _may_append(who: Caller, stream: str) -> None:
    if not who.may_append(stream):
        raise Problem(403, "outside_grant", f"the source {who.source_id!r} may not append to the stream {stream!r}: "
                      "it is outside the stream-id prefixes granted to it; nothing was appended")


# The append routes read their query themselves (FastAPI's parameters and dependencies cost a tenth of serve's CPU
# per single-event append); their OpenAPI says what FastAPI said of them.
_WAIT_DOC = "projected: answer once the (last) event is projected, or after timeout seconds"
_TIMEOUT_DOC = "how long wait=projected waits, seconds"
_EXPECTED_DOC = "the seq the stream must be at (0: new), else 409"
_QUERY_DOCS = {
    "expected_seq": {"name": "expected_seq", "in": "query", "required": False, "description": _EXPECTED_DOC,
                     "schema": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}],
                                "description": _EXPECTED_DOC, "title": "Expected Seq"}},
    "wait": {"name": "wait", "in": "query", "required": False, "description": _WAIT_DOC,
             "schema": {"anyOf": [{"const": "projected", "type": "string"}, {"type": "null"}],
                        "description": _WAIT_DOC, "title": "Wait"}},
    "timeout": {"name": "timeout", "in": "query", "required": False, "description": _TIMEOUT_DOC,
                "schema": {"type": "number", "maximum": MAX_WAIT_S, "exclusiveMinimum": 0, "default": 10.0,
                           "description": _TIMEOUT_DOC, "title": "Timeout"}},
}


@dataclass(frozen=True, slots=True)
class _Query:
    expected_seq: int | None
    wait: str | None
    timeout: float


def _query(request: Request, *, expected_seq: bool) -> _Query:
    """The append's query parameters, or a 422 ``invalid_request`` naming each invalid one."""
    given = request.query_params
    errors: list[dict[str, str]] = []
    expected = None
    if expected_seq and (raw := given.get("expected_seq")) is not None:
        if raw.isascii() and raw.isdigit():
            expected = int(raw)
        else:
            errors.append({"field": "query.expected_seq", "reason": "must be an integer, 0 or more"})
    wait = given.get("wait")
    if wait is not None and wait != "projected":
        errors.append({"field": "query.wait", "reason": "must be projected"})
    timeout = 10.0
    if (raw := given.get("timeout")) is not None:
        try:
            timeout = float(raw)
        except ValueError:
            timeout = math.nan
        if not 0 < timeout <= MAX_WAIT_S:  # NaN too
            errors.append({"field": "query.timeout", "reason": f"must be a number above 0, at most {MAX_WAIT_S:g}"})
    if errors:
        names = ", ".join(e["field"] for e in errors)
        raise Problem(422, "invalid_request", f"invalid request: {names}", errors=errors)
    return _Query(expected, wait, timeout)


@router.post("/v1/streams/{stream}/events", status_code=201, response_model=AppendResult, responses=_RESPONSES,
             summary="Append events to a stream", openapi_extra={**SIGNED, "parameters": [
                 _QUERY_DOCS["expected_seq"], _QUERY_DOCS["wait"], _QUERY_DOCS["timeout"]],
                 "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
                     _EVENT_SCHEMA, {"type": "array", "minItems": 1, "maxItems": MAX_BATCH,
                                     "items": _EVENT_SCHEMA}]}}}}})
async def append_events(stream: str, request: Request) -> Response:
    """One ``{"type", "data", "time"?, "idempotency_key"?}`` object or an array of up to 1,000, appended all or
    nothing with the caller's source (docs/http.md, "Appending")."""
    who = await authenticate(request)
    q = _query(request, expected_seq=True)
    svc: Services = request.app.state.services

    async def append() -> tuple[str, list[Appended]]:
        if not STREAM_ID_PATTERN.fullmatch(stream):
            raise Problem(422, "invalid_stream", f"the stream id {stream!r} must be 1 to 200 characters from "
                          "A-Z a-z 0-9 . _ : -", errors=[{"field": "stream", "reason": "not a stream id"}])
        _may_append(who, stream)
        if media_type(request.headers.get("content-type")) not in ("application/json", ""):
            raise Problem(415, "unsupported_media_type", "the body is application/json",
                          headers={"Accept-Post": "application/json"})
        events = simple_events(stream, await request.body(), source_id=who.source_id,
                               webhook_id=webhook_id(request))
        with refused_over_limit(who, len(events)):
            return stream, await svc.producer.append_batch(stream, events, expected_seq=q.expected_seq,
                                                           source=who.source,
                                                           admission=admission(svc, who, len(events)))

    stream_id, out, pending = await _appending("simple", append)
    return await _answer(svc, stream_id or stream, out, q.wait, q.timeout, pending=pending)


def _ce_mode(request: Request) -> str:
    kind = media_type(request.headers.get("content-type"))
    return {CE_STRUCTURED: "structured", CE_BATCH: "batched"}.get(kind, "binary")


@router.post("/v1/events", status_code=201, response_model=AppendResult, responses=_RESPONSES,
             summary="Append CloudEvents (HTTP binding: structured, batched or binary mode)",
             openapi_extra={**SIGNED, "parameters": [_QUERY_DOCS["wait"], _QUERY_DOCS["timeout"]],
                            "requestBody": {"required": True, "content": {
                                CE_STRUCTURED: {"schema": _CLOUDEVENT_SCHEMA},
                                CE_BATCH: {"schema": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH,
                                                      "items": _CLOUDEVENT_SCHEMA}},
                                "application/json": {"schema": {"type": "object"}}}}})
async def append_cloudevents(request: Request) -> Response:
    """Events of one stream (their ``subject``), chained by the server, or chained by their producer and published
    as they are if they link to the stream's head (docs/http.md, "CloudEvents")."""
    who = await authenticate(request)
    q = _query(request, expected_seq=False)
    svc: Services = request.app.state.services

    async def append() -> tuple[str, list[Appended]]:
        found: CloudEvents = cloudevents(request.headers.get("content-type"), request.headers, await request.body(),
                                         source_id=who.source_id, webhook_id=webhook_id(request))
        others = [s for s in found.sources if s != who.source]
        if others:
            raise Problem(403, "wrong_source", f"an event names the source {others[0]!r}; this credential writes as "
                          f"{who.source!r} only; nothing was appended", errors=[{"field": "source", "reason":
                                                                                  f"must be {who.source!r}"}])
        _may_append(who, found.stream)
        n = len(found.raw) if found.chained else len(found.events)
        tokens = admission(svc, who, n)
        with refused_over_limit(who, n):
            if found.chained:
                return found.stream, await svc.producer.append_chained(found.stream, found.raw, found.keys,
                                                                       admission=tokens)
            return found.stream, await svc.producer.append_batch(found.stream, found.events, source=who.source,
                                                                 admission=tokens)

    stream_id, out, pending = await _appending(_ce_mode(request), append)
    return await _answer(svc, stream_id, out, q.wait, q.timeout, pending=pending)
