"""The read API: executions, their events byte for byte, inclusion proofs and the newest checkpoints, from PostgreSQL.

Routes (docs/http.md "Reading"): ``GET /v1/executions``, ``GET /v1/executions/{stream}``,
``GET /v1/executions/{stream}/events``, ``GET /v1/events/{id}/proof`` and ``GET /v1/checkpoints/latest``. A caller
reads only streams under its read prefixes: a stream id outside them is answered 403 from the id alone (nothing is
looked up, so the answer says nothing of whether the stream exists); an event id names no stream, so an event of a
stream outside them is answered 404, as one that does not exist. Money is a decimal string, times RFC 3339 UTC.
The documents answered are ``documents``' models; a connection comes through ``services.reading``.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path, Query
from pydantic import AwareDatetime, Field
from starlette.requests import Request
from starlette.responses import Response

from runledger.projections.postgres import reads
from runledger.streams.http.auth import caller
from runledger.streams.http.caller import Caller
from runledger.streams.http.documents import (
    Artifact,
    Cost,
    ExecutionDetail,
    ExecutionPage,
    ExecutionSummary,
    InclusionProof,
    LatestCheckpoints,
    SignedCheckpoint,
    Status,
    Step,
    StepCounts,
    Totals,
    problem_responses,
)
from runledger.streams.http.problems import Problem
from runledger.streams.http.services import Services, reading, services

__all__ = ["EVENTS_MEDIA_TYPE", "MAX_PAGE", "router"]

router = APIRouter(tags=["reading"])

_REASONS = {400: "Bad request (a cursor that is not one of ours)", 401: "No valid signature",
            403: "Outside the caller's read scope", 404: "Not found, or not the caller's to read",
            409: "Not provable yet: no signed checkpoint covers the event (Retry-After)",
            422: "A parameter is invalid (each named in errors)",
            503: "PostgreSQL is unavailable (Retry-After)"}


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return problem_responses(_REASONS, *statuses)

MAX_PAGE = 500
"""The most executions or events one page holds (``limit``)."""
EVENTS_MEDIA_TYPE = "application/cloudevents-batch+json"
STREAM_PATTERN = r"^[A-Za-z0-9._:-]{1,200}$"
IDENTIFIER = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]+$")]


# --- Helpers ------------------------------------------------------------------------------------------------------

def _money(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


def _readable(who: Caller, stream: str) -> None:
    if not who.may_read(stream):
        raise Problem(403, "outside_read_scope", f"stream {stream} is outside what this source may read",
                      errors=[{"field": "stream", "reason": "outside the source's read scope"}])


def encode_cursor(started_at: datetime, stream_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([started_at.isoformat(), stream_id])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        started_at, stream_id = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        at = datetime.fromisoformat(started_at).astimezone(UTC)
        if not isinstance(stream_id, str) or not re.fullmatch(STREAM_PATTERN, stream_id):
            raise ValueError("not a cursor")
    except (ValueError, TypeError, OverflowError, binascii.Error, orjson.JSONDecodeError):
        raise Problem(400, "invalid_cursor", "the cursor is not one this API gave",
                      errors=[{"field": "cursor", "reason": "pass the next value of the previous page unchanged"}]
                      ) from None
    return at, stream_id


def _utc(value: datetime | None, name: str) -> datetime | None:
    """``value`` in UTC; a time that is no time in UTC (year 1 at +14:00) is a 422 naming the parameter."""
    try:
        return None if value is None else value.astimezone(UTC)
    except OverflowError:
        raise Problem(422, "invalid_request", f"{name} is out of range",
                      errors=[{"field": name, "reason": "out of range in UTC"}]) from None


# --- Routes -------------------------------------------------------------------------------------------------------

@router.get("/v1/executions", response_model=ExecutionPage, responses=_problems(400),
            summary="List executions, newest first, a page at a time")
async def list_executions(
        who: Annotated[Caller, Depends(caller)],
        svc: Annotated[Services, Depends(services)],
        status: Annotated[Status | None, Query(description="only executions in this status")] = None,
        workflow: Annotated[IDENTIFIER | None, Query(description="only this workflow")] = None,
        customer: Annotated[IDENTIFIER | None, Query(description="only this customer_id")] = None,
        started_from: Annotated[AwareDatetime | None, Query(
            description="only executions started at or after this time (RFC 3339, with its offset)")] = None,
        started_to: Annotated[AwareDatetime | None, Query(
            description="only executions started before this time (RFC 3339, with its offset)")] = None,
        cursor: Annotated[str | None, Query(max_length=1000, description="the previous page's next")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="executions per page")] = 100,
) -> ExecutionPage:
    """Executions the caller may read, newest first (``started_at``, then ``stream_id``, descending), filtered by
    each parameter given. Follow ``next`` until it is null: every execution that matched when the walk began is on
    exactly one page (one that starts meanwhile with an older ``started_at`` than the cursor shows up too)."""
    if not who.read_prefixes:
        return ExecutionPage(executions=[], next=None)
    selected = reads.ExecutionFilter(who.read_prefixes, status, workflow, customer,
                                     _utc(started_from, "started_from"), _utc(started_to, "started_to"))
    after = decode_cursor(cursor) if cursor is not None else None
    async with reading(svc, "list executions") as conn:
        rows, more = await reads.executions(conn, selected, after, limit)
    page = [ExecutionSummary(**{**dict(r), "cost_usd": _money(r["cost_usd"])}) for r in rows]
    last = rows[-1] if rows and more else None
    return ExecutionPage(executions=page, next=encode_cursor(last["started_at"], last["stream_id"]) if last else None)


StreamId = Annotated[str, Path(pattern=STREAM_PATTERN, description="the stream (execution) id",
                               examples=["acme:run-0001"])]


@router.get("/v1/executions/{stream}", response_model=ExecutionDetail, responses=_problems(403, 404),
            summary="One execution: status, steps, costs, artifacts and totals")
async def get_execution(stream: StreamId, who: Annotated[Caller, Depends(caller)],
                        svc: Annotated[Services, Depends(services)]) -> ExecutionDetail:
    """The execution as projected, read in one snapshot (its parts agree with its totals)."""
    _readable(who, stream)
    async with reading(svc, "read an execution") as conn:
        found = await reads.execution(conn, stream)
    if found is None:
        raise Problem(404, "execution_not_found", f"no execution {stream} is projected")
    return ExecutionDetail(
        **{k: found[k] for k in ("stream_id", "workflow", "agent_id", "customer_id", "status", "started_at",
                                 "ended_at", "error", "last_seq", "last_hash", "updated_at")},
        totals=Totals(steps=StepCounts(**{k: found[f"steps_{k}"] for k in StepCounts.model_fields}),
                      input_tokens=found["input_tokens"], output_tokens=found["output_tokens"],
                      cached_tokens=found["cached_tokens"], cost_usd=_money(found["cost_usd"]),
                      unpriced_costs=found["unpriced_costs"], budget_usd=_money(found["budget_usd"]),
                      duration_ms=found["duration_ms"]),
        steps=[Step(**{**dict(s), "order": s["step_order"], "cost_usd": _money(s["cost_usd"])})
               for s in found["steps"]],
        costs=[Cost(**{**dict(c), "cost_usd": _money(c["cost_usd"])}) for c in found["costs"]],
        artifacts=[Artifact(**dict(a)) for a in found["artifacts"]])


def _batch(raws: Iterable[bytes]) -> bytes:
    """A JSON array whose elements are the stored records verbatim (each is one JSON object)."""
    return b"[" + b",".join(raws) + b"]"


@router.get("/v1/executions/{stream}/events", response_class=Response,
            responses={200: {"description": "The events, in seq order, each element exactly the bytes the log holds "
                             "(their hashes verify over them). A Link header with rel=\"next\" names the next page.",
                             "headers": {"Link": {"description": "the next page, when there is one",
                                                  "schema": {"type": "string"}}},
                             "content": {EVENTS_MEDIA_TYPE: {"schema": {"type": "array",
                                                                        "items": {"type": "object"}}}}},
                       **_problems(403, 404)},
            summary="A stream's events as stored, byte for byte")
async def get_events(request: Request, stream: StreamId, who: Annotated[Caller, Depends(caller)],
                     svc: Annotated[Services, Depends(services)],
                     after_seq: Annotated[int, Query(ge=0, le=2**63 - 1,
                                                     description="only events with a greater seq")] = 0,
                     limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="events per page")] = 100
                     ) -> Response:
    """The stream's projected events after ``after_seq``, in seq order, as a CloudEvents JSON batch whose elements
    are the records' bytes exactly as the log holds them."""
    _readable(who, stream)
    async with reading(svc, "read a stream's events") as conn:
        found = await reads.events(conn, stream, after_seq, limit)
    if found is None:
        raise Problem(404, "stream_not_found", f"no event of stream {stream} is projected")
    page, more = found
    headers: dict[str, str] = {}
    if more and page:
        following = request.url.include_query_params(after_seq=page[-1][0], limit=limit)
        headers["Link"] = f'<{following.path}?{following.query}>; rel="next"'
    return Response(_batch(raw for _, raw in page), media_type=EVENTS_MEDIA_TYPE, headers=headers)


@router.get("/v1/events/{id}/proof", response_model=InclusionProof, responses=_problems(404, 409),
            summary="An event's inclusion proof under a signed checkpoint")
async def get_proof(id: Annotated[uuid.UUID, Path(description="the event id")],  # noqa: A002 - the path's name
                    who: Annotated[Caller, Depends(caller)], svc: Annotated[Services, Depends(services)]) -> Any:
    """The document ``runledger prove`` writes, under the newest checkpoint of the event's partition that covers it.
    Verify it (``runledger verify-proof``, or docs/proofs.md's code) with the log's verifier key: the server does
    not vouch for it. 404 for an event not projected or of a stream the caller may not read (the same answer, so an
    id says nothing of a stream one may not read); 409 with Retry-After while no checkpoint covers it."""
    try:
        async with reading(svc, "prove an event") as conn:
            proof = await reads.inclusion_proof(conn, svc.settings.checkpoint_origin, str(id))
    except reads.EventNotFound:
        raise Problem(404, "event_not_found", f"no event {id} is projected") from None
    except reads.ProofNotReady as e:
        if not who.may_read(e.stream_id):
            raise Problem(404, "event_not_found", f"no event {id} is projected") from None
        raise Problem(409, "proof_not_ready", str(e),
                      headers={"Retry-After": str(max(1, math.ceil(svc.settings.checkpoint_interval_s or 60)))}
                      ) from None
    if not who.may_read(proof.stream_id):
        raise Problem(404, "event_not_found", f"no event {id} is projected")
    return Response(orjson.dumps(proof.document), media_type="application/json")


@router.get("/v1/checkpoints/latest", response_model=LatestCheckpoints, responses=_problems(),
            summary="The newest signed checkpoint of each log partition")
async def latest_checkpoints(who: Annotated[Caller, Depends(caller)],
                             svc: Annotated[Services, Depends(services)]) -> LatestCheckpoints:
    """One per partition of the log topic that has one: the signed note verbatim (verify it with the log's verifier
    key) and what it says. Checkpoints name no stream: any caller may read them."""
    topic = svc.settings.events_topic
    async with reading(svc, "read the checkpoints") as conn:
        rows = await reads.latest_checkpoints(conn, svc.settings.checkpoint_origin, topic)
    return LatestCheckpoints(topic=topic, checkpoints=[_checkpoint(r) for r in rows])


def _checkpoint(row: Mapping[str, Any]) -> SignedCheckpoint:
    return SignedCheckpoint(partition=row["kafka_partition"], origin=row["origin"], size=row["size"],
                            root=bytes(row["root"]).hex(), key_name=row["key_name"], signed_at=row["signed_at"],
                            note=row["note"])
