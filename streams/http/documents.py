"""The documents the HTTP API answers, as pydantic models (their OpenAPI schemas): the RFC 9457 problem document
every error is, and the read API's executions, events, proofs and checkpoints. Money is a decimal string, times
RFC 3339 UTC."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runledger.streams.http.problems import PROBLEM_TYPE

__all__ = ["MONEY_PATTERN", "Artifact", "Cost", "ExecutionDetail", "ExecutionPage", "ExecutionSummary",
           "InclusionProof", "LatestCheckpoints", "Money", "ProblemDocument", "SignedCheckpoint", "Status", "Step",
           "StepCounts", "StepStatus", "Totals", "problem_responses"]

MONEY_PATTERN = r"^-?[0-9]+(\.[0-9]+)?$"
Money = Annotated[str, Field(pattern=MONEY_PATTERN, description="US dollars, a decimal string (never a float)",
                             examples=["0.0125"])]
Status = Literal["pending", "running", "completed", "failed", "cancelled", "timeout"]
StepStatus = Literal["pending", "running", "completed", "failed", "skipped", "retrying"]


class ProblemDocument(BaseModel):
    """An RFC 9457 problem document (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=[PROBLEM_TYPE + "execution_not_found"])
    title: str
    status: int = Field(ge=400, le=599)
    detail: str
    code: str = Field(description="a stable machine-readable name; docs/http.md lists them")
    instance: str | None = None
    errors: list[dict[str, str | int]] | None = Field(
        None, description='each failed field: {"field", "reason"} and, in a batch, "index"')


_PROBLEM_SCHEMA = ProblemDocument.model_json_schema()


def problem_responses(reasons: Mapping[int, str], *statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of problem documents for ``statuses`` (401, 422 and 503 always), each described by
    its route family's ``reasons``."""
    return {status: {"description": reasons[status],
                     "content": {"application/problem+json": {"schema": _PROBLEM_SCHEMA}}}
            for status in sorted({401, 422, 503, *statuses})}


class ExecutionSummary(BaseModel):
    """One execution in a list."""

    stream_id: str = Field(examples=["acme:run-0001"])
    workflow: str = Field(examples=["invoice-triage"])
    agent_id: str | None = None
    customer_id: str | None = None
    status: Status
    started_at: datetime
    ended_at: datetime | None = None
    duration_ms: int | None = None
    steps_total: int
    cost_usd: Money
    last_seq: int = Field(description="the seq of the stream's last projected event")
    updated_at: datetime


class ExecutionPage(BaseModel):
    """A page of executions, newest first (by ``started_at``, then ``stream_id``)."""

    executions: list[ExecutionSummary]
    next: str | None = Field(description="the cursor of the next page (pass it as ?cursor=); null on the last")

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "executions": [{"stream_id": "acme:run-0001", "workflow": "invoice-triage", "agent_id": "triage-bot",
                        "customer_id": "cust-42", "status": "completed", "started_at": "2026-11-22T10:00:00Z",
                        "ended_at": "2026-11-22T10:00:04.5Z", "duration_ms": 4500, "steps_total": 2,
                        "cost_usd": "0.0125", "last_seq": 9, "updated_at": "2026-11-22T10:00:05Z"}],
        "next": "WyIyMDI2LTExLTIyVDEwOjAwOjAwKzAwOjAwIiwiYWNtZTpydW4tMDAwMSJd"}]})


class Step(BaseModel):
    step_id: str
    name: str | None = None
    order: int | None = None
    status: StepStatus
    attempts: int
    started_at: datetime | None = None
    ended_at: datetime | None = None
    error: dict[str, Any] | None = None
    cost_usd: Money


class Cost(BaseModel):
    event_id: str
    seq: int
    step_id: str | None = None
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    cached_tokens: int | None = None
    cost_usd: Money | None = Field(None, description="null when the model had no price (cost_source unpriced)")
    cost_source: Literal["event", "catalog", "unpriced"]
    catalog_version: str | None = None
    occurred_at: datetime


class Artifact(BaseModel):
    artifact_id: str
    step_id: str | None = None
    type: str
    name: str
    uri: str
    size_bytes: int | None = None
    content_type: str | None = None
    created_at: datetime
    seq: int


class StepCounts(BaseModel):
    total: int
    running: int
    retrying: int
    completed: int
    failed: int
    skipped: int


class Totals(BaseModel):
    """The execution's sums as the projection keeps them."""

    steps: StepCounts
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost_usd: Money
    unpriced_costs: int = Field(description="costs of a model with no price, not in cost_usd")
    budget_usd: Money | None = None
    duration_ms: int | None = None


class ExecutionDetail(BaseModel):
    """One execution: its status, steps, costs, artifacts and totals, read in one snapshot."""

    stream_id: str
    workflow: str
    agent_id: str | None = None
    customer_id: str | None = None
    status: Status
    started_at: datetime
    ended_at: datetime | None = None
    error: dict[str, Any] | None = None
    last_seq: int
    last_hash: str = Field(description="the hash of the stream's last projected event")
    updated_at: datetime
    totals: Totals
    steps: list[Step]
    costs: list[Cost]
    artifacts: list[Artifact]


class InclusionProof(BaseModel):
    """What ``runledger prove`` writes (format ``runledger-inclusion-proof/2``, docs/proofs.md); check it with
    ``runledger verify-proof`` and the log's verifier key."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "format": "runledger-inclusion-proof/2",
        "checkpoint": "runledger.local/log/runledger.events/1\n12\nq2n...=\n\n\u2014 runledger.local/log AbCd...=\n",
        "partition": 1, "offset": 11, "leaf_index": 11, "event": "eyJzcGVjdmVyc2lvbiI6IjEuMCIsLi4ufQ==",
        "proof": ["3q2+7w==..."]}]})

    format: Literal["runledger-inclusion-proof/2"]
    checkpoint: str = Field(description="the signed C2SP tlog-checkpoint note of the event's log partition")
    partition: int
    offset: int
    leaf_index: int
    event: str = Field(description="the event's bytes as the log holds them, base64")
    proof: list[str] = Field(description="the RFC 9162 audit path, base64 hashes")


class SignedCheckpoint(BaseModel):
    partition: int
    origin: str = Field(examples=["runledger.local/log/runledger.events/0"])
    size: int = Field(description="leaves (records of the partition) the checkpoint covers")
    root: str = Field(description="the tree's root hash, lowercase hex")
    key_name: str
    signed_at: datetime
    note: str = Field(description="the signed note (C2SP tlog-checkpoint), verbatim")


class LatestCheckpoints(BaseModel):
    """The newest signed checkpoint of each partition of the log topic."""

    topic: str
    checkpoints: list[SignedCheckpoint]
