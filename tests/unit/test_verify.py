"""The chain auditor, handed stored events as a database superuser might have left them."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import orjson
import pytest

from runledger.schemas.chain import Head, compute_hash
from runledger.schemas.checkpoint import Checkpoint
from runledger.schemas.merkle import leaf_hash, root_of
from runledger.schemas.verify import ChainAuditor, Finding, StoredEvent, TreeAuditor
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


def test_the_tree_auditor_recomputes_the_signed_root() -> None:
    leaves = [leaf_hash(bytes.fromhex(e["hash"])) for e in VECTOR_EVENTS]
    rows = [(i, e["subject"], e["seq"], e["id"], orjson.dumps(e), leaves[i]) for i, e in enumerate(VECTOR_EVENTS)]

    def audit(checkpoint: Checkpoint, fed: list[Any]) -> list[str]:
        tree = TreeAuditor(checkpoint)
        return [f.code for f in [*tree.check(fed), *tree.finish()]]

    signed = Checkpoint("o", 12, root_of(leaves[:12]))
    assert audit(signed, rows) == []  # rows past the checkpoint's size are not its business
    assert audit(signed, rows[:10]) == ["log_shorter"]
    assert audit(signed, [*rows[:3], *rows[4:]]) == ["leaf_missing"]
    changed = {**VECTOR_EVENTS[5], "source": "/forged"}
    changed["hash"] = compute_hash(changed)
    forged = [*rows[:5], (5, "x", 6, "id", orjson.dumps(changed), leaves[5]), *rows[6:]]
    assert audit(signed, forged) == ["leaf_changed", "root_mismatch"]
    assert audit(signed, [*rows[:5], (5, "x", 6, "id", rows[5][4].replace(b'"seq":6', b'"seq":7'), None),
                          *rows[6:]]) == ["hash_mismatch", "root_mismatch"]
