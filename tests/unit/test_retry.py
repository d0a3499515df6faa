"""The retry schedule, the headers of retried and dead-lettered records, and dlq time ranges: pure logic."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from runledger.projections.records import Failure, LogRecord
from runledger.schemas.errors import HashMismatch, PredecessorMissing
from runledger.streams.tools.dlq import LetterFilter, parse_time
from runledger.streams.worker.retry import RetrySchedule, delay_name, failure_headers, from_retry_topic, message_time

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def test_the_schedule_names_topics_and_ends_after_the_last_delay() -> None:
    schedule = RetrySchedule("rl", (1.0, 2.0, 0.5))
    assert [t for _, t in schedule.topics] == ["rl.events.retry.1s", "rl.events.retry.2s", "rl.events.retry.500ms"]
    assert schedule.after(1) == (1.0, "rl.events.retry.1s")
    assert schedule.after(3) == (0.5, "rl.events.retry.500ms")
    assert schedule.after(4) is None
    assert schedule.max_attempts == 4
    assert delay_name(16) == "16s" and delay_name(2.5) == "2.5s"


@pytest.mark.parametrize("delays", [(1.0, 0.0), (1.0, 1.0)])
def test_a_schedule_with_a_zero_or_repeated_delay_is_refused(delays: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="retry_delays"):
        RetrySchedule("rl", delays)


def test_a_retried_record_keeps_its_original_place_and_history() -> None:
    first = NOW - timedelta(seconds=3)
    record = LogRecord("rl.events", 2, 41, b"s-1", b'{"x":1}', attempts=1, first_failed=first)
    failure = Failure(record, PredecessorMissing("s-1 seq 5: seq 4 is not projected yet"), NOW, "s-1", 5, "id", "t")
    headers = failure_headers(failure, due=NOW + timedelta(seconds=2))
    as_dict = dict(headers)
    assert as_dict["runledger.attempts"] == b"2" and as_dict["runledger.reason"] == b"predecessor_missing"
    assert as_dict["runledger.first_failure"] == b"2026-11-22T11:59:57.000Z"
    back, due = from_retry_topic("rl.events.retry.2s", 0, 7, b"s-1", b'{"x":1}', headers, NOW, 2.0)
    assert (back.topic, back.partition, back.offset, back.attempts, back.first_failed) == (
        "rl.events", 2, 41, 2, first)
    assert due == NOW + timedelta(seconds=2)


def test_a_message_without_headers_is_read_as_a_first_retry_of_itself() -> None:
    back, due = from_retry_topic("rl.events.retry.1s", 0, 7, None, b"junk", [("other", b"x")], NOW, 1.0)
    assert (back.topic, back.offset, back.attempts, back.first_failed, due) == (
        "rl.events.retry.1s", 7, 1, NOW, NOW + timedelta(seconds=1))


@pytest.mark.parametrize("headers", [
    {"original.topic": "rl.events", "original.partition": str(2**31), "original.offset": "1"},
    {"original.topic": "rl.events", "original.partition": "0", "original.offset": str(2**63)},
    {"original.topic": "rl\x00events", "original.partition": "0", "original.offset": "1"},
    {"original.topic": "x" * 300, "original.partition": "-1", "original.offset": "1"},
], ids=["partition", "offset", "nul", "long"])
def test_headers_postgres_could_not_store_fall_back_to_the_message_itself(headers: dict[str, str]) -> None:
    raw = [(f"runledger.{k}", v.encode()) for k, v in headers.items()]
    raw += [("runledger.attempts", b"99999999999"), ("runledger.first_failure", b"0001-01-01T00:00:00+05:00")]
    back, _ = from_retry_topic("rl.events.retry.1s", 3, 7, None, b"x", raw, NOW, 1.0)
    assert (back.topic, back.partition, back.offset, back.first_failed) == ("rl.events.retry.1s", 3, 7, NOW)
    assert back.attempts == 1000
    assert message_time(2**62) > NOW and message_time(NOW.timestamp() * 1000) == NOW


def test_dead_letter_headers_leave_out_what_is_unknown() -> None:
    failure = Failure(LogRecord("rl.events", 0, 3, None, b"x"), HashMismatch("a", "b"), NOW)
    names = {k for k, _ in failure_headers(failure)}
    assert "runledger.stream" not in names and "runledger.due" not in names
    assert {"runledger.reason", "runledger.error", "runledger.original.offset"} <= names
    claims = dict(failure_headers(replace(failure, claimed_stream_id="victim")))
    assert claims["runledger.claimed_stream"] == b"victim" and "runledger.stream" not in claims


@pytest.mark.parametrize(("text", "expected"), [
    ("2h", NOW - timedelta(hours=2)), ("30m", NOW - timedelta(minutes=30)), ("1d", NOW - timedelta(days=1)),
    ("90s", NOW - timedelta(seconds=90)), ("2026-11-22T10:00:00Z", datetime(2026, 11, 22, 10, tzinfo=UTC)),
    ("2026-11-22T11:00:00+01:00", datetime(2026, 11, 22, 10, tzinfo=UTC)),
])
def test_time_ranges_read_durations_and_rfc3339(text: str, expected: datetime) -> None:
    assert parse_time(text, now=NOW) == expected


@pytest.mark.parametrize(("text", "reason"), [("yesterday", "neither a duration"),
                                              ("2026-11-22T10:00:00", "no time zone")])
def test_a_bad_time_names_the_option_and_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"--until: .*{reason}"):
        parse_time(text, option="--until")


def test_a_filter_refuses_an_unknown_status_and_reports_itself_as_json() -> None:
    with pytest.raises(ValueError, match="--status: gone"):
        LetterFilter(statuses=("gone",))
    assert LetterFilter(reasons=("hash_mismatch",), since=NOW).as_json() == {
        "reasons": ["hash_mismatch"], "since": "2026-11-22T12:00:00.000Z", "statuses": ["dead"]}
