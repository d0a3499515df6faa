"""The chain auditor, handed stored events as a database superuser might have left them."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import orjson
import pytest

from runledger.schemas.chain import Head, compute_hash
from runledger.schemas.verify import ChainAuditor, Finding, LogAuditor, LogEntry, StoredEvent
from tests.conftest import VECTOR_EVENTS


def stored(event: dict[str, Any], **columns: Any) -> StoredEvent:
    row = {"stream_id": event["subject"], "seq": event["seq"], "raw": orjson.dumps(event), "event_id": event["id"],
           "hash": event["hash"], "prevhash": event["prevhash"], **columns}
    return StoredEvent(**row)


ROWS = sorted((stored(e) for e in VECTOR_EVENTS), key=lambda r: (r.stream_id, r.seq))
HEADS = {s: Head(rows[-1].seq, rows[-1].hash or "") for s, rows in
         ((s, list(g)) for s, g in itertools.groupby(ROWS, key=lambda r: r.stream_id))}
STREAM = "exec-2026-11-22-0001"


def audit(rows: list[StoredEvent], heads: dict[str, Head] | None = HEADS) -> list[Finding]:
    auditor = ChainAuditor(heads)
    found = [*auditor.check(rows[:5]), *auditor.check(rows[5:]), *auditor.finish()]  # fed in two chunks
    assert auditor.events == len(rows)
    return found


def at(stream: str, seq: int) -> int:
    return next(i for i, r in enumerate(ROWS) if (r.stream_id, r.seq) == (stream, seq))


def codes(found: list[Finding]) -> list[tuple[str, int | None, str]]:
    return [(f.stream_id, f.seq, f.code) for f in found]


def test_the_vectors_are_intact() -> None:
    assert audit(ROWS) == []


def test_changed_data_is_a_hash_mismatch_at_its_seq() -> None:
    rows = list(ROWS)
    event = orjson.loads(rows[at(STREAM, 4)].raw)
    event["data"]["cost_usd"] = "0.000001"
    rows[at(STREAM, 4)] = stored(event)
    [finding] = audit(rows)
    assert (finding.stream_id, finding.seq, finding.code) == (STREAM, 4, "hash_mismatch")
    assert finding.event_id == event["id"] and "hash to" in finding.reason


@pytest.mark.parametrize(("seq", "code"), [(1, "first_missing"), (5, "seq_gap"), (9, "head_mismatch")])
def test_a_deleted_row_is_found(seq: int, code: str) -> None:
    rows = [r for r in ROWS if (r.stream_id, r.seq) != (STREAM, seq)]
    assert [(f.stream_id, f.code) for f in audit(rows)] == [(STREAM, code)]


def test_swapped_payloads_disagree_with_their_columns() -> None:
    rows = list(ROWS)
    a, b = at(STREAM, 2), at(STREAM, 3)
    rows[a], rows[b] = (StoredEvent(rows[a].stream_id, rows[a].seq, rows[b].raw, rows[a].event_id, rows[a].hash,
                                    rows[a].prevhash),
                        StoredEvent(rows[b].stream_id, rows[b].seq, rows[a].raw, rows[b].event_id, rows[b].hash,
                                    rows[b].prevhash))
    [finding] = audit(rows)
    assert (finding.seq, finding.code) == (2, "row_mismatch") and "column seq is 2" in finding.reason


def test_a_forged_event_with_a_valid_hash_is_beyond_the_head() -> None:
    last = orjson.loads(ROWS[at(STREAM, 9)].raw)
    forged = {**last, "id": str(uuid.uuid4()), "seq": 10, "prevhash": last["hash"], "type": "execution.completed",
              "data": {}}
    forged["hash"] = compute_hash(forged)
    rows = sorted([*ROWS, stored(forged)], key=lambda r: (r.stream_id, r.seq))
    [finding] = audit(rows)
    assert (finding.stream_id, finding.code) == (STREAM, "head_mismatch") and "10..10" in finding.reason
    assert audit(rows, heads=None) == []  # without the heads, a consistent append is invisible: checkpoints see it


def test_a_rewritten_link_is_a_broken_chain() -> None:
    event = {**orjson.loads(ROWS[at(STREAM, 6)].raw), "prevhash": "f" * 64}
    event["hash"] = compute_hash(event)
    rows = list(ROWS)
    rows[at(STREAM, 6)] = stored(event)
    assert codes(audit(rows)) == [(STREAM, 6, "chain_broken")]


def test_a_deleted_stream_is_missing_and_bytes_that_are_not_json_are_named() -> None:
    rows = [r for r in ROWS if r.stream_id != STREAM]
    assert codes(audit(rows)) == [(STREAM, 9, "stream_missing")]
    rows = list(ROWS)
    rows[at(STREAM, 3)] = StoredEvent(STREAM, 3, b"{not json")
    assert codes(audit(rows)) == [(STREAM, 3, "not_json")]


def test_events_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match="sorted by stream"):
        audit([ROWS[0], ROWS[-1], ROWS[1]])


# The log auditor: the log topic's records as a worker reads them, partition by partition.

S = [e for e in VECTOR_EVENTS if e["subject"] == STREAM]  # seq 1..9
OTHERS = [e for e in VECTOR_EVENTS if e["subject"] != STREAM]


def forged(event: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``event`` with ``changes`` and a new id, hashed again: a valid event that is not the one in the log."""
    event = {**event, "id": str(uuid.uuid4()), **changes}
    event["hash"] = compute_hash(event)
    return event


def as_log(values: list[dict[str, Any] | bytes]) -> list[LogEntry]:
    """``values`` appended to a log of two partitions, each stream keyed to one, and read partition by partition;
    the streams interleaved as ``values`` interleave them."""
    partitions: list[list[LogEntry]] = [[], []]
    for value in values:
        subject = value["subject"] if isinstance(value, dict) else "?"
        p = sum(subject.encode()) % 2
        partitions[p].append(LogEntry(p, len(partitions[p]), subject.encode(),
                                      orjson.dumps(value) if isinstance(value, dict) else value))
    return partitions[0] + partitions[1]


def interleaved(*streams: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for events in itertools.zip_longest(*streams) for e in events if e is not None]


def audit_log(values: list[dict[str, Any] | bytes]) -> tuple[list[Finding], LogAuditor]:
    auditor = LogAuditor()
    log = as_log(values)
    found = [*auditor.check(log[:7]), *auditor.check(log[7:]), *auditor.finish()]  # fed in two chunks
    assert auditor.records == len(log)
    return found, auditor


def log_codes(values: list[dict[str, Any] | bytes]) -> list[tuple[str, int | None, str]]:
    return codes(audit_log(values)[0])


def where(values: list[dict[str, Any] | bytes], value: dict[str, Any] | bytes) -> tuple[int, int]:
    """The partition and offset ``as_log`` gives ``value`` (its first copy)."""
    raw = orjson.dumps(value) if isinstance(value, dict) else value
    return next((r.partition, r.offset) for r in as_log(values) if r.value == raw)


def test_interleaved_streams_of_the_log_are_intact() -> None:
    streams = [[e for e in VECTOR_EVENTS if e["subject"] == s] for s in dict.fromkeys(e["subject"]
                                                                                      for e in VECTOR_EVENTS)]
    values: list[dict[str, Any] | bytes] = [*interleaved(*streams)]
    assert {r.partition for r in as_log(values)} == {0, 1}  # the streams are spread over both partitions
    found, auditor = audit_log(values)
    assert found == []
    assert (auditor.records, auditor.events, auditor.duplicates, auditor.streams) == (18, 18, 0, 4)


def test_retried_copies_are_counted_not_reported() -> None:
    # A batch sent again after later events, the last event twice, and a copy of an event still held.
    values: list[dict[str, Any] | bytes] = [*S[:6], *S[:3], S[6], S[6], S[8], S[8], S[7], *OTHERS, S[1]]
    found, auditor = audit_log(values)
    assert found == []
    assert (auditor.records, auditor.events, auditor.duplicates, auditor.streams) == (24, 24, 6, 4)


def test_events_that_come_before_their_predecessor_are_held_until_it_comes() -> None:
    values: list[dict[str, Any] | bytes] = [*interleaved(list(reversed(S)), OTHERS)]
    assert audit_log(values)[0] == []
    assert log_codes([S[0], S[2], S[1], S[4], S[3], *S[5:]]) == []


FORK = forged(S[3], data={**S[3]["data"], "input_tokens": 1})  # valid, linked to seq 3, not the seq 4 logged


@pytest.mark.parametrize("values", [[S[0], S[1], S[3], FORK, S[2], *S[4:]], [*S[:4], FORK, *S[4:]],
                                    [*S[:8], FORK, S[8], *OTHERS]], ids=["held", "last", "linked-before"])
def test_another_event_at_a_taken_seq_is_a_fork(values: list[dict[str, Any] | bytes]) -> None:
    [finding] = audit_log(values)[0]
    assert (finding.stream_id, finding.seq, finding.event_id, finding.code) == (STREAM, 4, FORK["id"],
                                                                                "seq_duplicate")
    assert (finding.partition, finding.offset) == where(values, FORK)
    assert f"partition {finding.partition} offset {finding.offset}: seq 4 is in the log twice" in finding.reason
    assert FORK["hash"] in finding.reason and S[3]["hash"] in finding.reason


def test_a_missing_event_is_a_gap_or_a_missing_start_at_the_end() -> None:
    values: list[dict[str, Any] | bytes] = [*S[:4], *S[5:], *OTHERS]
    [finding] = audit_log(values)[0]
    assert (finding.stream_id, finding.seq, finding.event_id, finding.code) == (STREAM, 6, S[5]["id"], "seq_gap")
    assert "seq 5 is not in the log (the stream is intact up to seq 4)" in finding.reason
    assert (finding.partition, finding.offset) == where(values, S[5])
    assert log_codes([*S[1:], *OTHERS]) == [(STREAM, 2, "first_missing")]


@pytest.mark.parametrize("held", [False, True], ids=["in-order", "before-its-predecessor"])
def test_a_prevhash_that_does_not_link_is_a_broken_chain(held: bool) -> None:
    relinked = forged(S[5], prevhash="f" * 64)
    values: list[dict[str, Any] | bytes] = [*S[:4], *([relinked, S[4]] if held else [S[4], relinked]), *S[6:]]
    [finding] = audit_log(values)[0]
    assert (finding.stream_id, finding.seq, finding.code) == (STREAM, 6, "chain_broken")
    assert (finding.partition, finding.offset) == where(values, relinked)
    assert f"prevhash {'f' * 64} is not the hash {S[4]['hash']} of seq 5" in finding.reason


@pytest.mark.parametrize(("change", "reason"), [({"data": {**S[3]["data"], "input_tokens": 1}}, "hash to"),
                                                ({"data": {"n": 2**60}}, "cannot be canonicalised")],
                         ids=["changed", "uncanonical"])
def test_a_changed_event_is_a_hash_mismatch_and_its_stream_is_reported_once(change: dict[str, Any],
                                                                           reason: str) -> None:
    changed = {**S[3], **change}  # the hash it carries is the original's
    values: list[dict[str, Any] | bytes] = [*S[:3], changed, *S[4:], forged(S[5]), *OTHERS]
    [finding] = audit_log(values)[0]
    assert (finding.stream_id, finding.seq, finding.event_id, finding.code) == (STREAM, 4, S[3]["id"],
                                                                                "hash_mismatch")
    assert reason in finding.reason and (finding.partition, finding.offset) == where(values, changed)


def test_records_that_are_not_events_belong_to_no_stream() -> None:
    values: list[dict[str, Any] | bytes] = [*S[:2], b"{not json", b"[1, 2]", b'{"subject": "x", "seq": "1"}',
                                            *S[2:]]
    found, auditor = audit_log(values)
    assert codes(found) == [("", None, "not_json"), ("", None, "not_json"), ("", None, "not_event")]
    assert [(f.partition, f.offset) for f in found] == [where(values, v) for v in values[2:5]]
    assert found[0].reason.startswith(f"partition {found[0].partition} offset {found[0].offset}: the record")
    assert (auditor.records, auditor.events, auditor.streams) == (12, 9, 1)
    assert found[0].as_dict()["partition"] == found[0].partition
