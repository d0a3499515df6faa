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
from runledger.streams.producer.chains import Chain, LoggedEvent
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


@pytest.mark.parametrize(("event", "field"), [
    (started(workflow="w" * 201), "data.workflow"),
    (started(customer_id="c" * 5000), "data.customer_id"),
    (NewEvent("cost.incurred", {"provider": "p", "model": "m" * 3000, "input_tokens": 1, "output_tokens": 1}),
     "data.model"),
    (NewEvent("artifact.created", {"artifact_id": "a" * 201, "type": "log", "name": "n", "uri": "u"}),
     "data.artifact_id"),
])
def test_an_identifier_over_200_characters_is_refused_with_the_field_named(event: NewEvent, field: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        check_new_events("exec-1", [started(), event])
    assert caught.value.errors == [(field, "must be 1 to 200 characters (SPEC.md section 4)")]


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


def _logged(seq: int, prevhash: str, hash_: str, offset: int, type_: str = "step.started",
            partition: int = 0) -> LoggedEvent:
    return LoggedEvent("s", seq, prevhash, hash_, type_, partition, offset)


def test_recovery_follows_a_chain_in_seq_order_whatever_order_its_partitions_came_in() -> None:
    chain = Chain()
    chain.extend([_logged(3, "h2", "h3", 0, partition=1), _logged(1, "0" * 64, "h1", 0, "execution.started"),
                  _logged(2, "h1", "h2", 1), _logged(2, "h1", "x2", 2), _logged(5, "h4", "h5", 1, partition=1)])
    assert (chain.head.seq, chain.head.hash, chain.type, chain.forks) == (3, "h3", "step.started", [2])
    assert [e.seq for e in chain.waiting] == [5]  # seq 4 is missing: seq 5 waits for it
    chain.extend([_logged(4, "h3", "h4", 3)])
    assert (chain.head.seq, chain.waiting) == (5, [])


def test_of_two_events_at_one_seq_recovery_follows_the_first_in_the_log_whatever_their_hashes() -> None:
    # As a worker projects them: the second at seq 2 is a seq_conflict, and seq 3 built on it a chain_broken, even
    # though its hash sorts first (a producer that can write the log can grind one that does).
    first, ground = "f" * 64, "0" * 63 + "1"
    log = [_logged(1, "0" * 64, "h1", 0, "execution.started"), _logged(2, "h1", first, 1),
           _logged(2, "h1", ground, 2), _logged(3, ground, "g3", 3), _logged(3, first, "h3", 4)]
    chain = Chain()
    chain.extend(log)
    assert (chain.head.seq, chain.head.hash, chain.branch[2], chain.forks) == (3, "h3", first, [2, 3])


def test_recovery_skips_an_event_a_worker_dead_letters_for_its_lifecycle() -> None:
    chain = Chain()
    chain.extend([_logged(1, "0" * 64, "h1", 0, "execution.started"),
                  _logged(2, "h1", "x2", 1, "execution.started"),  # execution.started after seq 1: dead-lettered
                  _logged(2, "h1", "h2", 2, "execution.completed"), _logged(3, "h2", "h3", 3)])  # after the end
    assert (chain.head.seq, chain.head.hash, chain.type) == (2, "h2", "execution.completed")
