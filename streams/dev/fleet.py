"""A simulated fleet of agents: a realistic, reproducible mix of workflow executions.

Pure: returns the events to append (no I/O), so the demo, the tests and the
benchmarks share one generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from runledger.streams.producer.events import NewEvent

__all__ = ["Execution", "simulate_fleet"]

WORKFLOWS = {
    "invoice-triage": ["extract", "classify", "validate", "post"],
    "web-research": ["plan", "search", "read", "summarise"],
    "code-review": ["checkout", "analyse", "comment"],
    "support-reply": ["understand", "lookup", "draft", "review"],
    "nightly-eval": ["load", "run", "score"],
}
# (provider, model, priced by the producer?): the last one is in no public price catalog.
MODELS = [
    ("openai", "gpt-4o", True),
    ("openai", "gpt-4o-mini", False),
    ("anthropic", "claude-3-5-sonnet-20241022", False),
    ("anthropic", "claude-3-5-haiku-20241022", True),
    ("mistral", "mistral-large-latest", False),
    ("acme", "acme-internal-llm-v2", False),
]
ARTIFACT_TYPES = ["report", "log", "chart", "dataset", "code"]


@dataclass(frozen=True, slots=True)
class Execution:
    """One simulated run: its stream id, workflow, planned outcome and events."""

    stream_id: str
    workflow: str
    outcome: str
    events: list[NewEvent]


def _cost(rng: random.Random, step_id: str, at: datetime) -> NewEvent:
    provider, model, priced = rng.choice(MODELS)
    data: dict[str, Any] = {
        "provider": provider, "model": model, "step_id": step_id,
        "input_tokens": rng.randint(200, 20_000), "output_tokens": rng.randint(20, 4_000),
        "cached_tokens": rng.choice([0, 0, 0, rng.randint(100, 2_000)]),
    }
    if priced:
        # "f": str() of a small Decimal is exponent form ("1.7E-7"), which is not money (SPEC.md 4).
        data["cost_usd"] = format(Decimal(rng.randint(1, 500_000)) / Decimal(10**8), "f")
    return NewEvent("cost.incurred", data, time=at)


def _execution(rng: random.Random, index: int, start: datetime, run_tag: str) -> Execution:
    workflow = rng.choice(list(WORKFLOWS))
    stream_id = f"{run_tag}:{workflow}:{index:05d}"
    outcome = rng.choices(["completed", "failed", "cancelled", "timed_out"], [75, 12, 8, 5])[0]
    at = start
    def tick() -> datetime:
        nonlocal at
        at += timedelta(milliseconds=rng.randint(50, 5_000))
        return at
    events = [NewEvent("execution.started", {
        "workflow": workflow, "agent_id": f"agent-{rng.randint(1, 12)}",
        "customer_id": rng.choice(["acme", "globex", "initech", "umbrella"]),
        "input": {"request": index}, "budget_usd": rng.choice(["1.00", "2.50", "10.00"]),
    }, time=tick())]
    steps = WORKFLOWS[workflow]
    stop_at = len(steps) if outcome == "completed" else rng.randint(1, len(steps))
    for order, name in enumerate(steps[:stop_at], start=1):
        step_id = f"s{order}-{name}"
        if outcome == "completed" and rng.random() < 0.1:
            events.append(NewEvent("step.skipped", {"step_id": step_id, "reason": "not needed"}, time=tick()))
            continue
        events.append(NewEvent("step.started", {"step_id": step_id, "name": name, "order": order}, time=tick()))
        for attempt in range(1, rng.choice([1, 1, 1, 2, 3])):
            events.append(_cost(rng, step_id, tick()))
            events.append(NewEvent("step.retrying", {
                "step_id": step_id, "attempt": attempt, "max_retries": 3,
                "error": {"type": "RateLimited", "message": "429 from provider"}}, time=tick()))
        events.append(_cost(rng, step_id, tick()))
        if rng.random() < 0.15:
            events.append(NewEvent("artifact.created", {
                "artifact_id": f"{stream_id}/{step_id}", "step_id": step_id,
                "type": rng.choice(ARTIFACT_TYPES), "name": f"{name}.out",
                "uri": f"s3://runs/{index}/{name}.out", "size_bytes": rng.randint(100, 10**7)}, time=tick()))
        last = order == stop_at
        if outcome == "failed" and last:
            events.append(NewEvent("step.failed", {"step_id": step_id, "error": {
                "type": "ToolError", "message": f"{name} failed"}}, time=tick()))
        else:
            events.append(NewEvent("step.completed", {"step_id": step_id, "output": {"ok": True}}, time=tick()))
    final = {
        "completed": NewEvent("execution.completed", {"output": {"ok": True}}, time=tick()),
        "failed": NewEvent("execution.failed", {"error": {"type": "StepFailed", "message": "a step failed"}},
                           time=tick()),
        "cancelled": NewEvent("execution.cancelled", {"reason": "cancelled by user"}, time=tick()),
        "timed_out": NewEvent("execution.timed_out", {"after_seconds": 900}, time=tick()),
    }[outcome]
    events.append(final)
    return Execution(stream_id, workflow, outcome, events)


def simulate_fleet(executions: int, *, seed: int = 7, run_tag: str = "demo",
                   start: datetime | None = None) -> list[Execution]:
    """``executions`` simulated runs, the same for the same seed and tag."""
    rng = random.Random(seed)  # noqa: S311 - simulation, not security
    begin = start or datetime.now(UTC) - timedelta(hours=1)
    return [_execution(rng, i, begin + timedelta(seconds=rng.randint(0, 3_000)), run_tag)
            for i in range(executions)]
