"""Projection rules: pure functions from (stream state, event) to the new state and rows to add.

The state machine of SPEC.md section 5 lives here. Nothing here knows about
Kafka or PostgreSQL: the planner hands them loaded states and events in
``seq`` order; the states change in place (they are the batch's own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from runledger.projections.pricing import PriceCatalog
from runledger.schemas.errors import IllegalTransition
from runledger.schemas.events import (
    ArtifactCreated,
    CostIncurred,
    Event,
    EventData,
    ExecutionCancelled,
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionStarted,
    ExecutionTimedOut,
    StepCompleted,
    StepFailed,
    StepRetrying,
    StepSkipped,
    StepStarted,
)

__all__ = ["TERMINAL", "ArtifactRow", "CostRow", "ExecutionState", "Projected", "StepState", "apply"]

TERMINAL = frozenset({"completed", "failed", "cancelled", "timeout"})


@dataclass(slots=True)
class StepState:
    step_id: str
    status: str
    name: str | None = None
    order: int | None = None
    attempts: int = 0
    started_at: datetime | None = None
    ended_at: datetime | None = None
    error: dict[str, Any] | None = None
    cost_usd: Decimal = Decimal(0)


@dataclass(slots=True)
class ExecutionState:
    """One execution (stream) as the tables hold it."""

    stream_id: str
    workflow: str
    status: str
    started_at: datetime
    last_seq: int
    last_hash: str
    agent_id: str | None = None
    customer_id: str | None = None
    ended_at: datetime | None = None
    budget_usd: Decimal | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    unpriced_costs: int = 0
    error: dict[str, Any] | None = None
    steps: dict[str, StepState] = field(default_factory=dict)

    @property
    def duration_ms(self) -> int | None:
        if self.ended_at is None:
            return None
        return int((self.ended_at - self.started_at).total_seconds() * 1000)

    def step_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("running", "retrying", "completed", "failed", "skipped"), 0)
        for step in self.steps.values():
            if step.status in counts:
                counts[step.status] += 1
        return counts


@dataclass(frozen=True, slots=True)
class CostRow:
    event_id: str
    stream_id: str
    seq: int
    step_id: str | None
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    cached_tokens: int | None
    cost_usd: Decimal | None
    cost_source: Literal["event", "catalog", "unpriced"]
    catalog_version: str | None
    occurred_at: datetime


@dataclass(frozen=True, slots=True)
class ArtifactRow:
    stream_id: str
    artifact_id: str
    step_id: str | None
    type: str
    name: str
    uri: str
    size_bytes: int | None
    content_type: str | None
    created_at: datetime
    seq: int


@dataclass(frozen=True, slots=True)
class Projected:
    """What one event does: the stream's new state, the steps it touched, and rows to insert."""

    state: ExecutionState
    touched_steps: tuple[str, ...] = ()
    costs: tuple[CostRow, ...] = ()
    artifacts: tuple[ArtifactRow, ...] = ()


def _illegal(event: Event, why: str) -> IllegalTransition:
    return IllegalTransition(f"{event.type} at seq {event.seq} of {event.subject!r}: {why}")


def _open_step(state: ExecutionState, event: Event, step_id: str, allowed: frozenset[str]) -> StepState:
    step = state.steps.get(step_id)
    if step is None:
        raise _illegal(event, f"step {step_id!r} was never started")
    if step.status not in allowed:
        raise _illegal(event, f"step {step_id!r} is {step.status}")
    return step


def apply(state: ExecutionState | None, event: Event, catalog: PriceCatalog) -> Projected:
    """Project one event onto ``state`` (None: the stream has no event yet), changing ``state`` in place.

    Every check comes before any change, so an event that raises IllegalTransition
    (what SPEC.md section 5 does not allow) leaves ``state`` as it was. Ordering and
    chain checks (seq, prevhash) are the caller's: ``apply`` assumes ``event`` is the
    next one of its stream.
    """
    data = event.data
    if state is None:
        return Projected(_started(event, data))
    if isinstance(data, ExecutionStarted):
        raise _illegal(event, "the execution has already started")
    if state.status in TERMINAL:
        raise _illegal(event, f"the execution already ended ({state.status})")
    if isinstance(data, CostIncurred):
        done = _cost(state, event, data, catalog)
    elif isinstance(data, ArtifactCreated):
        done = Projected(state, artifacts=(ArtifactRow(
            event.subject, data.artifact_id, data.step_id, data.type, data.name, data.uri, data.size_bytes,
            data.content_type, event.time, event.seq),))
    elif isinstance(data, ExecutionCompleted | ExecutionFailed | ExecutionCancelled | ExecutionTimedOut):
        state.status, state.ended_at = _ENDS[type(data)], event.time
        if isinstance(data, ExecutionFailed):
            state.error = dict(data.error)
        done = Projected(state)
    else:
        done = Projected(state, (_step(state, event, data),))
    state.last_seq, state.last_hash = event.seq, event.hash
    return done


_ENDS: dict[type, str] = {ExecutionCompleted: "completed", ExecutionFailed: "failed",
                          ExecutionCancelled: "cancelled", ExecutionTimedOut: "timeout"}
_OPEN = frozenset({"running", "retrying"})


def _started(event: Event, data: EventData) -> ExecutionState:
    if not isinstance(data, ExecutionStarted):
        raise _illegal(event, "the first event of a stream must be execution.started")
    if event.seq != 1:
        raise _illegal(event, "execution.started must be seq 1")
    return ExecutionState(
        stream_id=event.subject, workflow=data.workflow, status="running", started_at=event.time,
        last_seq=event.seq, last_hash=event.hash, agent_id=data.agent_id, customer_id=data.customer_id,
        budget_usd=data.budget_usd)


def _step(state: ExecutionState, event: Event, data: EventData) -> str:
    """Apply a step event; the id of the step it touched."""
    steps = state.steps
    if isinstance(data, StepStarted):
        old = steps.get(data.step_id)
        if old is not None and old.status not in ("pending", "retrying"):
            raise _illegal(event, f"step {data.step_id!r} is already {old.status}")
        steps[data.step_id] = StepState(
            data.step_id, "running", data.name, data.order, old.attempts if old else 0,
            old.started_at if old and old.started_at else event.time, None, None,
            old.cost_usd if old else Decimal(0))
    elif isinstance(data, StepRetrying):
        step = _open_step(state, event, data.step_id, _OPEN)
        step.status, step.attempts, step.error = "retrying", data.attempt, data.error
    elif isinstance(data, StepCompleted | StepFailed):
        step = _open_step(state, event, data.step_id, _OPEN)
        step.ended_at = event.time
        if isinstance(data, StepFailed):
            step.status, step.error = "failed", dict(data.error)
        else:
            step.status = "completed"
    elif isinstance(data, StepSkipped):
        old = steps.get(data.step_id)
        if old is not None and old.status != "pending":
            raise _illegal(event, f"step {data.step_id!r} is {old.status}, it cannot be skipped")
        steps[data.step_id] = StepState(data.step_id, "skipped", ended_at=event.time,
                                        error={"reason": data.reason} if data.reason else None)
    else:
        raise TypeError(f"no projection rule for {event.type}")
    return data.step_id


def _cost(state: ExecutionState, event: Event, data: CostIncurred, catalog: PriceCatalog) -> Projected:
    row = _cost_row(event, data, catalog)
    cost = row.cost_usd
    state.input_tokens += data.input_tokens
    state.output_tokens += data.output_tokens
    state.cached_tokens += data.cached_tokens or 0
    if cost is None:
        state.unpriced_costs += 1
        return Projected(state, costs=(row,))
    state.cost_usd += cost
    step = state.steps.get(data.step_id) if data.step_id else None
    if step is None:
        return Projected(state, costs=(row,))
    step.cost_usd += cost
    return Projected(state, (step.step_id,), (row,))


def _cost_row(event: Event, data: CostIncurred, catalog: PriceCatalog) -> CostRow:
    common = dict(event_id=event.id, stream_id=event.subject, seq=event.seq, step_id=data.step_id,
                  provider=data.provider, model=data.model, input_tokens=data.input_tokens,
                  output_tokens=data.output_tokens, cached_tokens=data.cached_tokens, occurred_at=event.time)
    if data.cost_usd is not None:
        return CostRow(**common, cost_usd=data.cost_usd, cost_source="event", catalog_version=None)  # type: ignore[arg-type]
    price = catalog.lookup(data.provider, data.model)
    if price is None:
        return CostRow(**common, cost_usd=None, cost_source="unpriced", catalog_version=catalog.version)  # type: ignore[arg-type]
    cost = price.cost(data.input_tokens, data.output_tokens, data.cached_tokens or 0)
    return CostRow(**common, cost_usd=cost, cost_source="catalog", catalog_version=catalog.version)  # type: ignore[arg-type]
