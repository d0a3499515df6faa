"""The projection check's rules, by handing them events and rows: no database."""

from __future__ import annotations

from decimal import Decimal

import orjson

from runledger.projections.consistency import ProjectionAuditor, expected_rows
from runledger.projections.pricing import load_tokencost_catalog
from tests.conftest import VECTOR_EVENTS

CATALOG = load_tokencost_catalog()
A = "exec-2026-11-22-0001"


def events_of(stream: str) -> list[tuple[int, str, bytes]]:
    return [(e["seq"], e["id"], orjson.dumps(e)) for e in VECTOR_EVENTS if e["subject"] == stream]


def test_rows_that_equal_the_rules_output_are_intact_and_each_change_is_named() -> None:
    events = events_of(A)
    stored = expected_rows(A, events, {}, CATALOG, {})
    auditor = ProjectionAuditor({}, CATALOG)
    assert list(auditor.check(A, events, stored)) == []
    assert (auditor.events, auditor.streams) == (9, 1)
    cost_id = VECTOR_EVENTS[4]["id"]
    cost = list(stored["costs"][cost_id])
    cost[9] += Decimal("0.01")
    stored["costs"][cost_id] = tuple(cost)
    del stored["steps"]["s2"]
    stored["artifacts"]["forged"] = stored["artifacts"]["art-1"]
    found = [(f.table, f.key, f.code, f.seq) for f in auditor.check(A, events, stored)]
    assert found == [("steps", "s2", "row_missing", None), ("costs", cost_id, "row_differs", 5),
                     ("artifacts", "forged", "row_extra", 7)]


def test_a_stored_event_the_rules_refuse_is_named() -> None:
    events = events_of(A)
    events[7], events[8] = events[8], events[7]  # a step skipped after the execution completed
    found = list(ProjectionAuditor({}, CATALOG).check(A, events, expected_rows(A, events_of(A), {}, CATALOG, {})))
    assert [(f.code, f.seq, f.event_id) for f in found] == [("event_refused", 8, VECTOR_EVENTS[7]["id"])]
    assert "already ended" in found[0].reason
