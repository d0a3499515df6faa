"""Projection rules, by handing them events: no Kafka, no database."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest

from runledger.projections.pricing import ModelPrice, PriceCatalog, load_tokencost_catalog
from runledger.projections.rules import ExecutionState, apply
from runledger.schemas.chain import GENESIS_HASH, compute_hash
from runledger.schemas.errors import IllegalTransition
from runledger.schemas.events import Event, format_time, parse_event
from tests.conftest import VECTORS

CATALOG = load_tokencost_catalog()
START = datetime(2026, 11, 22, 10, tzinfo=UTC)


def project(events: list[Event], catalog: PriceCatalog = CATALOG) -> tuple[dict[str, ExecutionState], list[Any]]:
    states: dict[str, ExecutionState] = {}
    rows: list[Any] = []
    for event in events:
        done = apply(states.get(event.subject), event, catalog)
        states[event.subject] = done.state
        rows += [*done.costs, *done.artifacts]
    return states, rows


def vector_events() -> list[Event]:
    return [parse_event(orjson.dumps(orjson.loads(line)["event"])) for line in VECTORS.read_bytes().splitlines()]


class Stream:
    """Builds a valid chain for one stream, event by event."""

    def __init__(self, subject: str = "exec-1") -> None:
        self.subject, self.seq, self.prev = subject, 0, GENESIS_HASH

    def __call__(self, type_: str, **data: Any) -> Event:
        self.seq += 1
        raw = {"specversion": "1.0", "id": f"00000000-0000-4000-8000-{self.seq:012d}", "source": "/t",
               "type": type_, "subject": self.subject, "time": format_time(START + timedelta(seconds=self.seq)),
               "datacontenttype": "application/json", "seq": self.seq, "prevhash": self.prev, "data": data}
        raw["hash"] = self.prev = compute_hash(raw)
        return parse_event(raw)


def test_the_vectors_project_to_the_expected_state() -> None:
    states, rows = project(vector_events())
    first = states["exec-2026-11-22-0001"]
    assert (first.status, first.workflow, first.agent_id, first.customer_id) == (
        "completed", "invoice-triage", "agent-7", "acme")
    assert first.cost_usd == Decimal("0.013800000000")  # 0.006000 from the event + 0.0078 from the catalog
    assert (first.input_tokens, first.output_tokens, first.cached_tokens) == (2400, 580, 0)
    assert first.budget_usd == Decimal("2.50") and first.duration_ms == 8000
    assert first.step_counts() == {"running": 0, "retrying": 0, "completed": 1, "failed": 0, "skipped": 1}
    s1 = first.steps["s1"]
    assert (s1.status, s1.attempts, s1.cost_usd, s1.name, s1.order) == ("completed", 1, Decimal("0.0138"),
                                                                        "extract", 1)
    assert states["exec-2026-11-22-0002"].status == "failed"
    assert states["exec-2026-11-22-0002"].error == {"type": "StepFailed", "message": "fetch failed"}
    assert states["exec-2026-11-22-0002"].steps["fetch"].status == "failed"
    assert states["tenant:eu.exec_0003"].status == "cancelled"
    assert states["tenant:eu.exec_0003"].cost_usd == Decimal("0.000000000001")
    assert states["exec-2026-11-22-0004"].status == "timeout"
    assert states["exec-2026-11-22-0004"].duration_ms == 3_600_000
    costs = [r for r in rows if hasattr(r, "cost_source")]
    assert [(c.model, c.cost_usd, c.cost_source) for c in costs] == [
        ("gpt-4o", Decimal("0.006000"), "event"),
        ("claude-3-5-sonnet-20241022", Decimal("0.0078"), "catalog"),
        ("mistral-large-latest", Decimal("0.000000000001"), "event"),
    ]
    assert costs[1].catalog_version == CATALOG.version
    [artifact] = [r for r in rows if hasattr(r, "uri")]
    assert (artifact.artifact_id, artifact.type, artifact.size_bytes) == ("art-1", "report", 48213)


def test_an_unknown_model_is_unpriced_never_guessed() -> None:
    e = Stream()
    states, rows = project([e("execution.started", workflow="w"),
                            e("cost.incurred", provider="acme", model="acme-9", input_tokens=10, output_tokens=1)])
    assert (rows[0].cost_usd, rows[0].cost_source) == (None, "unpriced")
    assert (states["exec-1"].cost_usd, states["exec-1"].unpriced_costs) == (Decimal(0), 1)


def test_catalog_prices_cached_tokens_at_the_cached_rate() -> None:
    catalog = PriceCatalog("v1", "test", {"m": ModelPrice("m", "p", Decimal("0.000002"), Decimal("0.00001"),
                                                          Decimal("0.0000005"))})
    e = Stream()
    _, rows = project([e("execution.started", workflow="w"),
                       e("cost.incurred", provider="p", model="m", input_tokens=1000, output_tokens=100,
                         cached_tokens=400)], catalog)
    assert rows[0].cost_usd == Decimal("0.0012") + Decimal("0.0002") + Decimal("0.001")


def test_100000_micro_costs_sum_exactly() -> None:
    rng = random.Random(11)
    e = Stream()
    events = [e("execution.started", workflow="w")]
    amounts = [Decimal(rng.randint(1, 10**11)) / Decimal(10**12) for _ in range(99_998)]
    amounts += [Decimal("0.000000000001"), Decimal("0.1")]
    for amount in amounts:
        events.append(e("cost.incurred", provider="p", model="m", input_tokens=1, output_tokens=1,
                        cost_usd=format(amount, "f")))
    states, _ = project(events)
    assert states["exec-1"].cost_usd == sum(amounts, Decimal(0))
    assert len(str(states["exec-1"].cost_usd).split(".")[1]) == 12


@pytest.mark.parametrize(
    ("script", "why"),
    [
        ([("step.started", {"step_id": "s", "name": "n"})], "must be execution.started"),
        ([("execution.started", {"workflow": "w"}), ("execution.started", {"workflow": "w"})], "already started"),
        ([("execution.started", {"workflow": "w"}), ("execution.completed", {}),
          ("step.started", {"step_id": "s", "name": "n"})], "already ended (completed)"),
        ([("execution.started", {"workflow": "w"}), ("step.completed", {"step_id": "s"})], "never started"),
        ([("execution.started", {"workflow": "w"}), ("step.started", {"step_id": "s", "name": "n"}),
          ("step.completed", {"step_id": "s"}), ("step.failed", {"step_id": "s",
                                                                 "error": {"type": "t", "message": "m"}})],
         "is completed"),
        ([("execution.started", {"workflow": "w"}), ("step.started", {"step_id": "s", "name": "n"}),
          ("step.skipped", {"step_id": "s"})], "cannot be skipped"),
        ([("execution.started", {"workflow": "w"}), ("execution.timed_out", {}),
          ("execution.cancelled", {})], "already ended (timeout)"),
    ],
)
def test_illegal_transitions_are_permanent_errors(script: list[tuple[str, dict[str, Any]]], why: str) -> None:
    e = Stream()
    events = [e(t, **d) for t, d in script]
    with pytest.raises(IllegalTransition, match=why.replace("(", r"\(").replace(")", r"\)")) as caught:
        project(events)
    assert not caught.value.transient and caught.value.code == "illegal_transition"


def test_a_retried_step_counts_attempts_and_restarts() -> None:
    e = Stream()
    states, _ = project([e("execution.started", workflow="w"), e("step.started", step_id="s", name="n"),
                         e("step.retrying", step_id="s", attempt=1), e("step.retrying", step_id="s", attempt=2),
                         e("step.started", step_id="s", name="n"), e("step.completed", step_id="s")])
    step = states["exec-1"].steps["s"]
    assert (step.status, step.attempts) == ("completed", 2)


def test_an_illegal_event_leaves_the_state_as_it_was() -> None:
    e = Stream()
    events = [e("execution.started", workflow="w"), e("step.started", step_id="s", name="n"),
              e("cost.incurred", step_id="s", provider="p", model="m", input_tokens=1, output_tokens=1,
                cost_usd="0.5")]
    states, _ = project(events)
    state = states["exec-1"]
    before = repr(state)
    for illegal in [e("step.retrying", step_id="nope", attempt=1), e("step.skipped", step_id="s"),
                    e("execution.started", workflow="w")]:
        with pytest.raises(IllegalTransition):
            apply(state, illegal, CATALOG)
    assert repr(state) == before and state.last_seq == 3
