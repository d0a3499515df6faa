"""The transparency logs of the log topic (SPEC.md section 7), defined by Kafka alone: what a signer derives from a
partition's records, and what a verifier finds when it compares PostgreSQL's copy with them. Pure: no I/O.

Leaf ``i`` of partition ``p`` is the ``i``-th record read from ``p`` from its start; its input is the record's
value byte for byte, valid event or not, so the tree commits to everything the partition holds. A partition's
checkpoints have the origin ``<origin>/<topic>/<partition>``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson

from runledger.schemas.checkpoint import Checkpoint, CheckpointError
from runledger.schemas.merkle import TreeState, fold, leaf_hash
from runledger.schemas.verify import Finding

__all__ = ["FRONTIER_HEADER", "AuditRow", "Frontier", "PartitionComparer", "Refused", "SignedLog", "origin_of",
           "partition_of"]

FRONTIER_HEADER = "runledger-frontier"
"""The Kafka header of a published checkpoint that carries the tree's compact frontier (``Frontier``)."""


def origin_of(base: str, topic: str, partition: int) -> str:
    """The origin of the checkpoints of ``topic``'s partition ``partition``."""
    return f"{base}/{topic}/{partition}"


def partition_of(origin: str, base: str) -> tuple[str, int]:
    """(topic, partition) of a partition's origin under ``base``; CheckpointError if it is not one."""
    topic, _, partition = origin.removeprefix(f"{base}/").rpartition("/")
    if not origin.startswith(f"{base}/") or not topic or not partition.isdigit():
        raise CheckpointError(f"origin {origin!r} is not <{base}>/<topic>/<partition>")
    return topic, int(partition)


@dataclass(frozen=True, slots=True)
class Frontier:
    """What a signer needs to extend a tree it signed without reading it again: the roots of the perfect subtrees
    its size splits into (largest first), and the offset after its last leaf. Published beside the signed note,
    unsigned: it is used only if it folds to the signed root."""

    next_offset: int
    peaks: tuple[bytes, ...]

    def encode(self) -> bytes:
        return orjson.dumps({"next_offset": self.next_offset,
                             "peaks": [base64.b64encode(p).decode() for p in self.peaks]})

    @classmethod
    def decode(cls, raw: bytes) -> Frontier:
        try:
            value = orjson.loads(raw)
            return cls(int(value["next_offset"]), tuple(base64.b64decode(p, validate=True) for p in value["peaks"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"the frontier cannot be read: {e}") from None

    def fits(self, checkpoint: Checkpoint) -> bool:
        """Does it describe the tree ``checkpoint`` signed: one peak per bit of its size, folding to its root?"""
        return (len(self.peaks) == checkpoint.size.bit_count() and all(len(p) == 32 for p in self.peaks)
                and fold(self.peaks) == checkpoint.root and self.next_offset >= checkpoint.size)


class Refused(Exception):
    """The signer will not sign this partition: the log no longer gives a root it signed before (a fork)."""


@dataclass(slots=True)
class SignedLog:
    """One partition's transparency log as its signer knows it: every checkpoint signed of it (size -> root), and
    the tree derived from the partition's records, extended from the newest signed frontier.

    Feed it the checkpoints published before (``signed_before``), then the partition's records from
    ``next_offset`` on (``append``); ``checkpoint`` says what to sign, or raises Refused. It never offers a
    checkpoint inconsistent with one signed before: the tree is extended only from a signed frontier, every
    signed size it passes while reading must give the signed root, and the size it offers must not have been
    signed with another root.
    """

    origin: str
    signed: dict[int, bytes] = field(default_factory=dict)
    tree: TreeState = field(default_factory=TreeState)
    next_offset: int = 0
    fork: str | None = None

    def signed_before(self, checkpoint: Checkpoint, frontier: Frontier | None) -> None:
        """A checkpoint of this origin signed with the signer's key (its signature checked by the caller)."""
        known = self.signed.setdefault(checkpoint.size, checkpoint.root)
        if known != checkpoint.root:
            self.fork = (f"two checkpoints of size {checkpoint.size} were signed, with roots {known.hex()} and "
                         f"{checkpoint.root.hex()}")
        if frontier is not None and frontier.fits(checkpoint) and checkpoint.size > self.tree.size:
            self.tree = TreeState(checkpoint.size, list(frontier.peaks))
            self.next_offset = frontier.next_offset

    def append(self, offset: int, value: bytes) -> bytes:
        """The partition's next record (at ``offset``); its leaf hash."""
        leaf = leaf_hash(value)
        self.tree.append(leaf)
        self.next_offset = offset + 1
        size = self.tree.size
        if self.fork is None and size in self.signed and self.signed[size] != self.tree.root():
            self.fork = (f"the log's first {size:,} records give root {self.tree.root().hex()}, but a checkpoint "
                         f"signed root {self.signed[size].hex()} for them: the log was rewritten since")
        return leaf

    def checkpoint(self) -> Checkpoint | None:
        """The checkpoint to sign now: None if the tree has not grown past what was signed; Refused if signing
        would contradict a checkpoint signed before."""
        if self.fork is not None:
            raise Refused(f"{self.origin}: {self.fork}")
        size, root = self.tree.size, self.tree.root()
        newest = max(self.signed, default=0)
        if size < newest:
            raise Refused(f"{self.origin}: the log holds {size:,} records, fewer than the {newest:,} signed before")
        if size in self.signed or not size:  # signed already, with this root: ``append`` checked it
            return None
        return Checkpoint(self.origin, size, root)

    def frontier(self) -> Frontier:
        return Frontier(self.next_offset, tuple(self.tree.peaks))


class AuditRow(NamedTuple):
    """An ``audit_log`` row as ``verify log`` reads it (``audit_at_positions``): its log position, its event, a
    digest of its bytes, and the leaf it names."""

    offset: int
    event_id: str
    stream_id: str
    seq: int
    sha256: bytes
    tree: int | None
    leaf_index: int | None


@dataclass(slots=True)
class PartitionComparer:
    """Compares what PostgreSQL holds of one log partition (its audit rows in offset order, its tree's leaves in
    index order, the tree's size and root) with the partition's records, fed in log order with ``feed``.

    ``projected_to``: the tree's next offset; a record before it that no audit row holds is handed back
    (``unmatched``) for the caller to account for (a duplicate, a dead letter, a parked event). ``limit``: stop
    after this many leaves (a checkpoint's size).
    """

    topic: str
    partition: int
    rows: Sequence[AuditRow]
    leaves: Sequence[tuple[int, bytes, int | None]]  # (index, hash, offset) of each stored leaf, in order
    tree_id: int | None
    stored_size: int
    stored_root: bytes
    limit: int | None = None
    tree: TreeState = field(default_factory=TreeState)
    findings: list[Finding] = field(default_factory=list)  # found while fed; ``finish`` yields them
    unmatched: list[tuple[int, bytes]] = field(default_factory=list)
    _row: int = 0
    _root_at_stored: bytes | None = None
    _leaf_differs: bool = False

    @property
    def done(self) -> bool:
        return self.limit is not None and self.tree.size >= self.limit

    def feed(self, records: Iterable[tuple[int, bytes]]) -> None:
        rows, leaves = self.rows, self.leaves
        for offset, value in records:
            if self.done:
                return
            index = self.tree.size
            leaf = leaf_hash(value)
            self.tree.append(leaf)
            if index < len(leaves) and not self._leaf_differs:
                stored = leaves[index]
                if stored[1] != leaf or stored[2] != offset:
                    self._leaf_differs = True
                    self.findings.append(self._finding(
                        "tree_leaf_differs", offset, f"leaf {index:,} of the stored tree is not the record at offset "
                        f"{offset}: the tree was rewritten"))
            if self.tree.size == self.stored_size:
                self._root_at_stored = self.tree.root()
            digest = None
            while self._row < len(rows) and rows[self._row].offset <= offset:
                row = rows[self._row]
                self._row += 1
                if row.offset < offset:
                    self.findings.append(self._row_finding(row, "audit_not_in_log", "the log holds no record at its "
                                                           "position: an event that was never on the log"))
                    continue
                digest = digest or hashlib.sha256(value).digest()
                if row.sha256 != digest:
                    self.findings.append(self._row_finding(row, "audit_differs", "its bytes are not the record's at "
                                                           "its position in the log: the event was changed"))
                elif (row.tree, row.leaf_index) != (self.tree_id, index):
                    self.findings.append(self._row_finding(row, "leaf_index_wrong", f"it names leaf {row.leaf_index} "
                                                           f"of tree {row.tree}, the record is leaf {index} of tree "
                                                           f"{self.tree_id}"))
            if digest is None:
                self.unmatched.append((offset, value))

    def finish(self, read_to: int) -> Iterator[Finding]:
        """Every finding, after the last record (the partition read to offset ``read_to``, exclusive)."""
        yield from self.findings
        for row in self.rows[self._row:]:
            if self.limit is None or (row.leaf_index is not None and row.leaf_index < self.limit):
                yield self._row_finding(row, "audit_not_in_log", f"the log ends at offset {read_to}: an event that "
                                        "was never on the log")
        if self.limit is not None:
            return
        if self.stored_size > self.tree.size:
            yield self._finding("tree_longer", read_to, f"the stored tree holds {self.stored_size:,} leaves, the "
                                f"log {self.tree.size:,}: leaves that are no record of the log")
        elif self.stored_size and self._root_at_stored != self.stored_root:
            yield self._finding("tree_root_differs", None, f"the stored tree's root at size {self.stored_size:,} is "
                                f"{self.stored_root.hex()}, the log's {(self._root_at_stored or b'').hex()}")

    def _finding(self, code: str, offset: int | None, reason: str) -> Finding:
        return Finding("", None, None, code, f"{self.topic} partition {self.partition}: {reason}", self.partition,
                       offset)

    def _row_finding(self, row: AuditRow, code: str, reason: str) -> Finding:
        return Finding(row.stream_id, row.seq, row.event_id, code,
                       f"audit_log row at {self.topic} partition {self.partition} offset {row.offset}: {reason}",
                       self.partition, row.offset)
