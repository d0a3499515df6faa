"""Which events each endpoint is owed, and what a retry copy says, without I/O: the filter, the endpoint's start,
records that are no event (too large, not JSON) owed to no one, one message id per endpoint and event whatever the
copies, headers someone else wrote refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson

from runledger.projections.records import LogRecord
from runledger.schemas.chain import compute_hash
from runledger.schemas.events import MAX_EVENT_BYTES
from runledger.streams.webhooks.endpoints import Filter
from runledger.streams.webhooks.messages import EndpointView, match, msg_id, read_retry_headers, retry_headers
from tests.conftest import VECTOR_EVENTS

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def record(offset: int, value: bytes) -> LogRecord:
    return LogRecord("p.events", 0, offset, b"k", value)


def test_an_endpoint_is_owed_what_matches_its_filter_from_when_it_was_added() -> None:
    events = VECTOR_EVENTS[:9]
    records = [(record(n, orjson.dumps(e)), T0 + timedelta(seconds=n)) for n, e in enumerate(events)]
    every = EndpointView("all", Filter(), T0)
    late = EndpointView("late", Filter(), T0 + timedelta(seconds=5))  # added after the first five
    completed = EndpointView("done", Filter(types=("execution.completed",)), T0)
    elsewhere = EndpointView("other", Filter(stream_prefix="nope-"), T0)
    messages, skipped = match(records, [every, late, completed, elsewhere])
    assert skipped == []
    owed = {ep: [(m.stream_id, m.seq) for m in messages if m.endpoint_id == ep] for ep in ("all", "late", "done")}
    assert owed["all"] == [(e["subject"], e["seq"]) for e in events]
    assert owed["late"] == [(e["subject"], e["seq"]) for e in events[5:]]
    assert owed["done"] == [(e["subject"], e["seq"]) for e in events if e["type"] == "execution.completed"]
    assert not [m for m in messages if m.endpoint_id == "other"]
    first = next(m for m in messages if m.endpoint_id == "all")
    assert first.body == records[0][0].value and (first.partition, first.offset) == (0, 0)  # as stored
    assert first.msg_id == msg_id("all", events[0]["hash"])


def test_a_copy_of_a_record_is_the_same_message_and_another_endpoint_another() -> None:
    event = VECTOR_EVENTS[0]
    copies = [(record(n, orjson.dumps(event)), T0) for n in range(2)]
    messages, _ = match(copies, [EndpointView("a", Filter(), T0), EndpointView("b", Filter(), T0)])
    ids = [m.msg_id for m in messages]
    assert ids[0] == ids[2] != ids[1] == ids[3] and all(i.startswith("msg_") and len(i) == 36 for i in ids)


def test_records_that_are_no_event_are_owed_to_no_one_and_said() -> None:
    too_large = orjson.dumps({**VECTOR_EVENTS[0], "pad": "x" * MAX_EVENT_BYTES})
    records = [(record(0, b"not json"), T0), (record(1, too_large), T0),
               (record(2, orjson.dumps({**VECTOR_EVENTS[0], "hash": "0" * 64})), T0)]
    messages, skipped = match(records, [EndpointView("a", Filter(), T0)])
    assert messages == []
    assert [(s.offset, s.reason) for s in skipped] == [(0, "invalid_json"), (1, "too_large"), (2, "hash_mismatch")]


def test_a_retry_copy_says_its_message_attempt_and_due_time_and_a_stranger_s_is_refused() -> None:
    headers = retry_headers("msg_" + "a" * 32, "ep", 3, T0, "answered 503: retry 2 of 5")
    copy = read_retry_headers([(k, v.encode()) for k, v in headers.items()])
    assert copy is not None and (copy.msg_id, copy.attempt, copy.due) == ("msg_" + "a" * 32, 3, T0)
    assert read_retry_headers([]) is None
    assert read_retry_headers([("runledger.webhook.msg_id", b"x"), ("runledger.webhook.attempt", b"2")]) is None
    assert read_retry_headers([("runledger.webhook.msg_id", b"msg_1"), ("runledger.webhook.attempt", b"0")]) is None
    naive = read_retry_headers([("runledger.webhook.msg_id", b"msg_1"), ("runledger.webhook.attempt", b"2"),
                                ("runledger.webhook.due", b"2026-12-05T12:00:00")])
    assert naive is not None and naive.due is None  # a time without its zone is not trusted: due now


def test_an_endpoint_a_source_added_is_owed_only_what_that_source_may_read_now() -> None:
    events = [{**VECTOR_EVENTS[0], "subject": subject} for subject in ("acme:1", "zeta:1")]
    for e in events:
        e["hash"] = compute_hash(e)
    records = [(record(n, orjson.dumps(e)), T0) for n, e in enumerate(events)]
    scoped = EndpointView("theirs", Filter(), T0, scope=("acme:",))
    revoked = EndpointView("gone", Filter(), T0, scope=())  # its source revoked: reads nothing
    owners = EndpointView("ours", Filter(), T0)  # the owner added it: no scope
    messages, _ = match(records, [scoped, revoked, owners])
    assert [(m.endpoint_id, m.stream_id) for m in messages] == [("theirs", "acme:1"), ("ours", "acme:1"),
                                                                ("ours", "zeta:1")]
