"""The per-partition transparency logs: what the signer derives and refuses, and what a comparison of PostgreSQL's
copy with the partition's records finds."""

from __future__ import annotations

from typing import NamedTuple

import orjson
import pytest

from runledger.schemas.checkpoint import Checkpoint, CheckpointError
from runledger.schemas.logtrees import (
    AuditRow,
    Frontier,
    PartitionComparer,
    Refused,
    RowName,
    SignedLog,
    partition_of,
)
from runledger.schemas.merkle import TreeState, leaf_hash, root_of
from tests.conftest import VECTOR_EVENTS

RECORDS = [orjson.dumps(e) for e in VECTOR_EVENTS]
LEAVES = [leaf_hash(r) for r in RECORDS]
ORIGIN = "runledger.test/log/t.events/0"


def derived(n: int, offset: int = 0) -> SignedLog:
    log = SignedLog(ORIGIN)
    for i, record in enumerate(RECORDS[:n]):
        log.append(offset + i, record)
    return log


def test_origins_name_a_partition_of_a_topic() -> None:
    assert partition_of("runledger.test/log/t.events/12", "runledger.test/log") == ("t.events", 12)
    for origin in ("runledger.test/log", "other/t.events/1", "runledger.test/log/t.events/x"):
        with pytest.raises(CheckpointError):
            partition_of(origin, "runledger.test/log")


def test_the_signer_signs_the_tree_of_the_records_and_extends_it_from_a_signed_frontier() -> None:
    log = derived(10)
    checkpoint = log.checkpoint()
    assert checkpoint == Checkpoint(ORIGIN, 10, root_of(LEAVES[:10]))
    frontier = log.frontier()
    assert frontier.fits(checkpoint) and Frontier.decode(frontier.encode()) == frontier
    later = SignedLog(ORIGIN)  # a new signer process: its state is what was published
    later.signed_before(checkpoint, frontier)
    assert later.checkpoint() is None and later.read_from == 9  # nothing grew; the last leaf is read again
    for i in range(9, len(RECORDS)):
        later.append(i, RECORDS[i])
    assert later.checkpoint() == Checkpoint(ORIGIN, len(RECORDS), root_of(LEAVES))


def test_a_log_recreated_since_it_was_signed_is_not_extended() -> None:
    signed = derived(10)
    checkpoint, frontier = signed.checkpoint(), signed.frontier()
    assert checkpoint is not None
    later = SignedLog(ORIGIN)
    later.signed_before(checkpoint, frontier)
    later.append(9, b"another log's record at the same offset")  # the log was recreated and written again
    for i in range(10, len(RECORDS)):
        later.append(i, RECORDS[i])
    with pytest.raises(Refused, match="not the one the tree's leaf 9 was made of"):
        later.checkpoint()


def test_a_frontier_that_does_not_fold_to_the_signed_root_is_not_used() -> None:
    checkpoint = derived(10).checkpoint()
    assert checkpoint is not None
    lying = Frontier(10, tuple(TreeState(10, [b"\x00" * 32, b"\x01" * 32]).peaks), LEAVES[9])
    log = SignedLog(ORIGIN)
    log.signed_before(checkpoint, lying)
    assert log.tree.size == 0 and log.next_offset == 0  # derived again from the partition's start


def test_the_signer_never_signs_a_second_root_for_a_size_it_signed() -> None:
    rewritten = [*RECORDS[:4], b'{"forged": true}', *RECORDS[5:10]]
    signed = Checkpoint(ORIGIN, 10, root_of([leaf_hash(r) for r in rewritten]))
    log = SignedLog(ORIGIN)
    log.signed_before(signed, None)  # published without a frontier: the signer reads the log from its start
    for i, record in enumerate(RECORDS[:10]):
        log.append(i, record)
    with pytest.raises(Refused, match=r"first 10 records give root .* but a checkpoint signed root"):
        log.checkpoint()


def test_the_signer_refuses_a_log_that_no_longer_gives_a_root_it_signed_on_the_way() -> None:
    rewritten = [*RECORDS[:4], b'{"forged": true}', *RECORDS[5:10]]
    log = SignedLog(ORIGIN)
    log.signed_before(Checkpoint(ORIGIN, 6, root_of([leaf_hash(r) for r in rewritten[:6]])), None)
    for i, record in enumerate(RECORDS):
        log.append(i, record)
    with pytest.raises(Refused, match="first 6 records give root"):
        log.checkpoint()
    two = SignedLog(ORIGIN)
    two.signed_before(Checkpoint(ORIGIN, 3, root_of(LEAVES[:3])), None)
    two.signed_before(Checkpoint(ORIGIN, 3, root_of(LEAVES[1:4])), None)
    with pytest.raises(Refused, match="two checkpoints of size 3"):
        two.checkpoint()


def rows_of(records: list[bytes], tree: int = 1) -> list[AuditRow]:
    return [AuditRow(i, leaf_hash(r), tree, i) for i, r in enumerate(records)]


def names_of(rows: list[AuditRow]) -> list[RowName]:
    return [RowName(r.offset, f"id-{i}", "s", i + 1) for i, r in enumerate(rows)]


class Message(NamedTuple):
    offset: int
    value: bytes | None


def compare(rows: list[AuditRow], stored: list[tuple[int, bytes, int | None]] | None = None,
            records: list[bytes] = RECORDS) -> tuple[list[str], list[int]]:
    stored = [(i, leaf, i) for i, leaf in enumerate(LEAVES)] if stored is None else stored
    comparer = PartitionComparer("t.events", 0, rows, 1, len(stored), root_of([h for _, h, _ in stored]))
    comparer.feed(Message(i, r) for i, r in enumerate(records))
    found = list(comparer.finish(len(records)))
    found += comparer.row_findings(n for n in names_of(rows) if n.offset in comparer.wrong_rows)
    if comparer.root_differs and (differing := comparer.first_leaf_differing(stored)) is not None:
        found.append(differing)
    return [f"{f.code}@{f.offset}" for f in found], [o for o, _ in comparer.unmatched]


def test_postgresql_matching_the_log_has_no_findings() -> None:
    assert compare(rows_of(RECORDS)) == ([], [])


def test_each_way_postgresql_can_differ_from_the_log_is_named_by_position() -> None:
    rows = rows_of(RECORDS)
    edited = rows_of([b"edited"])[0]._replace(offset=5, leaf_index=5)
    assert compare([*rows[:5], edited, *rows[6:]])[0] == ["audit_differs@5"]
    assert compare([*rows[:5], *rows[6:]]) == ([], [5])  # a deleted row: the caller accounts for the record
    forged = rows[0]._replace(offset=len(RECORDS) + 3)
    assert compare([*rows, forged])[0] == [f"audit_not_in_log@{len(RECORDS) + 3}"]
    twin = rows[3]._replace(leaf=leaf_hash(b"a second event at one position"))
    assert compare([*rows[:4], twin, *rows[4:]])[0] == ["audit_differs@3"]
    assert compare([*rows[:2], rows[2]._replace(leaf_index=9), *rows[3:]])[0] == ["leaf_index_wrong@2"]
    late = rows[2]._replace(tree=None, leaf_index=None)  # written from a retry topic before its leaf was
    assert compare([*rows[:2], late, *rows[3:]]) == ([], [])
    leaves = [(i, leaf, i) for i, leaf in enumerate(LEAVES)]
    leaves[4] = (4, b"\x00" * 32, 4)
    assert compare(rows, leaves)[0] == ["tree_root_differs@None", "tree_leaf_differs@4"]
    longer = [*((i, leaf, i) for i, leaf in enumerate(LEAVES)), (len(LEAVES), b"\x01" * 32, len(LEAVES))]
    assert compare(rows, longer)[0] == [f"tree_longer@{len(RECORDS)}", f"tree_leaf_differs@{len(RECORDS)}"]


def test_the_root_level_by_level_is_rfc_9162s() -> None:
    from runledger.schemas.merkle import fold, subtrees

    for n in range(1, 70):
        tree = TreeState()
        for leaf in (leaf_hash(bytes([i % 256, i // 256])) for i in range(n)):
            tree.append(leaf)
        leaves = [leaf_hash(bytes([i % 256, i // 256])) for i in range(n)]
        assert root_of(leaves) == tree.root() == fold([root_of(leaves[i << lv:(i + 1) << lv])
                                                        for lv, i in subtrees(0, n)])


def test_a_wrong_row_is_named_by_its_own_event_among_rows_at_one_offset() -> None:
    rows = rows_of(RECORDS)
    twin = rows[3]._replace(leaf=leaf_hash(b"a second event at one position"))
    table = [*rows[:4], twin, *rows[4:]]  # two rows at offset 3: the second is wrong
    comparer = PartitionComparer("t.events", 0, table, 1, len(LEAVES), root_of(LEAVES))
    comparer.feed(Message(i, r) for i, r in enumerate(RECORDS))
    assert list(comparer.finish(len(RECORDS))) == [] and comparer.wrong_rows == [3]
    [finding] = comparer.row_findings(n for n in names_of(table) if n.offset == 3)
    assert (finding.stream_id, finding.seq, finding.event_id, finding.offset) == ("s", 5, "id-4", 3)
