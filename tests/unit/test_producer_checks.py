"""What a producer refuses before anything is reserved, staged or published (no services needed)."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import orjson
import pytest

from runledger.schemas.chain import Head
from runledger.schemas.errors import InvalidEvent, TooLarge
from runledger.schemas.events import MAX_EVENT_BYTES, parse_event
from runledger.streams.producer.events import NewEvent, build_events, check_new_events

NUL = "contains U+0000"


def started(note: str = "n", **data: Any) -> NewEvent:
    return NewEvent("execution.started", {"workflow": "w", "input": {"note": note}, **data})


@pytest.mark.parametrize(
    ("event", "field", "reason"),
    [
        (started("a\x00b"), "data.input.note", NUL),
        (NewEvent("execution.started", {"workflow": "w", "input": {"deep": {"a\x00b": 1}}}), "data.input.deep",
         "key 'a\\x00b' " + NUL),
        (NewEvent("step.completed", {"step_id": "s1", "output": {"rows": ["ok", "b\x00"]}}), "data.output.rows[1]",
         NUL),
        (NewEvent("step.skipped", {"step_id": "s\x00"}), "data.step_id", NUL),
    ],
)
def test_u0000_is_refused_with_the_field_named(event: NewEvent, field: str, reason: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        check_new_events("exec-1", [event])
    assert caught.value.field == field and reason in caught.value.reason
    assert "\x00" not in str(caught.value)


def test_data_too_large_on_its_own_is_refused_before_anything_is_reserved() -> None:
    with pytest.raises(TooLarge) as caught:
        check_new_events("exec-1", [started(), started("x" * MAX_EVENT_BYTES)])
    assert caught.value.field == "data" and caught.value.code == "too_large"
    assert "512 KiB" in str(caught.value)


def test_build_events_refuses_an_event_whose_encoding_is_over_the_limit() -> None:
    # The data alone fits, so check_new_events lets it through; the envelope tips it over.
    almost = started("x" * (MAX_EVENT_BYTES - 100))
    check_new_events("exec-1", [almost])
    with pytest.raises(TooLarge) as caught:
        build_events("/producers/test", "exec-1", Head(), [started(), almost])
    assert "stream 'exec-1' seq 2" in str(caught.value)
    assert caught.value.code == "too_large"


def test_build_events_keeps_an_event_at_the_limit() -> None:
    def value(note: str) -> bytes:
        return build_events("/producers/test", "exec-1", Head(4), [started(note)]).values[0]
    room = MAX_EVENT_BYTES - len(value(""))
    [at_limit] = build_events("/producers/test", "exec-1", Head(4), [started("x" * room)]).values
    assert len(at_limit) == MAX_EVENT_BYTES
    assert parse_event(at_limit).seq == 5  # what a worker reads: not too large


def test_money_as_decimal_still_passes() -> None:
    check_new_events("exec-1", [started(budget_usd=Decimal("0.00000017"))])
    [value] = build_events("/p", "exec-1", Head(), [started(budget_usd=Decimal("0.00000017"))]).values
    assert orjson.loads(value)["data"]["budget_usd"] == "0.00000017"


def test_data_that_is_not_json_is_an_invalid_event() -> None:
    with pytest.raises(InvalidEvent) as caught:
        check_new_events("exec-1", [NewEvent("step.skipped", {"step_id": "s1", "tags": {"a", "b"}})])
    assert caught.value.field == "data"


def test_the_lifecycle_a_head_decides() -> None:
    from runledger.schemas.errors import IllegalTransition
    from runledger.schemas.lifecycle import check_lifecycle

    check_lifecycle("s", 0, None, ["execution.started", "step.started", "execution.completed"])
    check_lifecycle("s", 4, None, ["step.started"])  # an older head that did not record its type
    for head, last, types, why in [
        (0, None, ["step.started"], "the first event of a stream must be execution.started"),
        (3, "step.started", ["execution.started"], "execution.started must be seq 1"),
        (3, "execution.failed", ["step.started"], "the execution already ended (execution.failed)"),
        (0, None, ["execution.started", "execution.cancelled", "cost.incurred"], "already ended"),
    ]:
        with pytest.raises(IllegalTransition, match=re.escape(why)) as caught:
            check_lifecycle("s", head, last, types)
        assert caught.value.code == "illegal_transition"


def test_recovery_follows_a_chain_in_seq_order_whatever_order_its_partitions_came_in() -> None:
    from runledger.streams.producer.recovery import _follow

    found = [(3, "h2", "h3", "step.started"), (1, "0" * 64, "h1", "execution.started"),
             (2, "h1", "h2", "step.started"), (2, "h1", "x2", "step.started"), (5, "h4", "h5", "step.started")]
    head = _follow(found)
    assert (head.seq, head.hash, head.type, head.forks) == (3, "h3", "step.started", [2])  # seq 4 is missing
