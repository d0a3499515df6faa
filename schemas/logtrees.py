"""The transparency logs of the log topic (SPEC.md section 7), defined by Kafka alone: what a signer derives from a
partition's records, and what a verifier finds when it compares PostgreSQL's copy with them. Pure: no I/O.

Leaf ``i`` of partition ``p`` is the ``i``-th record read from ``p`` from its start; its input is the record's
value byte for byte, valid event or not, so the tree commits to everything the partition holds. A partition's
checkpoints have the origin ``<origin>/<topic>/<partition>``.
"""

from __future__ import annotations

import array
import base64
import hashlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import orjson

from runledger.schemas.checkpoint import Checkpoint, CheckpointError
from runledger.schemas.merkle import TreeState, fold, leaf_hash, root_of
from runledger.schemas.verify import Finding

__all__ = ["FRONTIER_HEADER", "AuditRow", "Frontier", "PartitionComparer", "Refused", "RowName", "SignedLog",
           "origin_of", "partition_of"]

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
    its size splits into (largest first), the offset after its last leaf, and that leaf's hash (checked against
    the record there before the tree is extended: a log recreated since is not extended). Published beside the
    signed note, unsigned: it is used only if it folds to the signed root."""

    next_offset: int
    peaks: tuple[bytes, ...]
    last_leaf: bytes

    def encode(self) -> bytes:
        return orjson.dumps({"next_offset": self.next_offset, "last_leaf": base64.b64encode(self.last_leaf).decode(),
                             "peaks": [base64.b64encode(p).decode() for p in self.peaks]})

    @classmethod
    def decode(cls, raw: bytes) -> Frontier:
        try:
            value = orjson.loads(raw)
            return cls(int(value["next_offset"]), tuple(base64.b64decode(p, validate=True) for p in value["peaks"]),
                       base64.b64decode(value["last_leaf"], validate=True))
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
    last_leaf: bytes = b""
    fork: str | None = None

    def signed_before(self, checkpoint: Checkpoint, frontier: Frontier | None) -> None:
        """A checkpoint of this origin signed with the signer's key (its signature checked by the caller)."""
        known = self.signed.setdefault(checkpoint.size, checkpoint.root)
        if known != checkpoint.root:
            self.fork = (f"two checkpoints of size {checkpoint.size} were signed, with roots {known.hex()} and "
                         f"{checkpoint.root.hex()}")
        if frontier is not None and frontier.fits(checkpoint) and checkpoint.size > self.tree.size:
            self.tree = TreeState(checkpoint.size, list(frontier.peaks))
            self.next_offset, self.last_leaf = frontier.next_offset, frontier.last_leaf

    @property
    def read_from(self) -> int:
        """Where to read the partition from: the last leaf's record (checked by ``append``), or the start."""
        return self.next_offset - 1 if self.tree.size else self.next_offset

    def append(self, offset: int, value: bytes) -> bytes | None:
        """The partition's next record (at ``offset``); its leaf hash. The last leaf's record, read again to
        check the log is still the one the tree was made of, is no leaf (None)."""
        leaf = leaf_hash(value)
        if self.tree.size and offset < self.next_offset:
            if self.fork is None and leaf != self.last_leaf:
                self.fork = (f"the record at offset {offset} is not the one the tree's leaf {self.tree.size - 1:,} "
                             "was made of: the log was recreated or rewritten since it was signed")
            return None
        self.tree.append(leaf)
        self.next_offset, self.last_leaf = offset + 1, leaf
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
        return Frontier(self.next_offset, tuple(self.tree.peaks), self.last_leaf)


class AuditRow(NamedTuple):
    """An ``audit_log`` row as ``verify log`` reads it (``audit_at_positions``, in (offset, event id) order): its
    log position, the leaf hash of its bytes (SHA-256(0x00 || raw), computed by PostgreSQL) and the leaf it names
    (None: the leaf at its position, for a row written before its leaf was, from a retry topic).
    The comparer reads rows by position, so asyncpg's records of that query do as they are. What names a row's
    event (stream, seq, id) is read only for the rows found wrong (``RowName``)."""

    offset: int
    leaf: bytes
    tree: int | None
    leaf_index: int | None


class RowName(NamedTuple):
    """What names an audit row's event, in the rows' order at one offset (``audit_names_at``)."""

    offset: int
    event_id: str
    stream_id: str
    seq: int


class _Message(Protocol):
    offset: int
    value: bytes | None


@dataclass(slots=True)
class PartitionComparer:
    """Compares what PostgreSQL holds of one log partition (its audit rows in offset order, its tree's id, size
    and root) with the partition's records, fed in log order with ``feed``; ``finish`` yields the findings.

    A record no audit row holds is handed back (``unmatched``) for the caller to account for (a duplicate, a
    dead letter, a parked event). If the stored tree's root is not the records' (``root_differs``), the caller
    hands the stored leaves to ``first_leaf_differing`` to name where. ``limit``: stop after this many records
    (a checkpoint's size).
    """

    topic: str
    partition: int
    rows: Sequence[AuditRow]
    tree_id: int | None
    stored_size: int
    stored_root: bytes
    limit: int | None = None
    leaves: list[bytes] = field(default_factory=list)  # of the records read, in order
    offsets: list[int] = field(default_factory=list)
    unmatched: list[tuple[int, bytes]] = field(default_factory=list)
    _rows_found: list[tuple[int, int, str, str]] = field(default_factory=list)  # offset, rank there, code, reason
    _row: int = 0
    _differs: bool | None = None

    @property
    def size(self) -> int:
        return len(self.leaves)

    def root(self, size: int) -> bytes:
        """The root of the first ``size`` records' tree."""
        return root_of(self.leaves[:size])

    def feed(self, records: Iterable[_Message]) -> None:
        rows, leaves, offsets = self.rows, self.leaves, self.offsets
        n, at, tree = len(rows), self._row, self.tree_id
        stop = len(leaves) + (1 << 62) if self.limit is None else self.limit
        sha256 = hashlib.sha256
        for record in records:  # the common case first: one row at the record's offset, its leaf and index right
            index = len(leaves)
            if index >= stop:
                break
            offset, value = record.offset, record.value or b""
            leaf = sha256(b"\x00" + value).digest()
            leaves.append(leaf)
            offsets.append(offset)
            if at < n and (row := rows[at])[0] == offset and row[1] == leaf and row[2] == tree and row[3] == index \
                    and (at + 1 == n or rows[at + 1][0] > offset):
                at += 1
                continue
            matched, last, rank = False, -1, 0
            while at < n and rows[at][0] <= offset:
                row = rows[at]
                at += 1
                rank, last = (rank + 1 if row[0] == last else 0), row[0]
                if row[0] < offset:
                    self._row_finding(row[0], rank, "audit_not_in_log", "the log holds no record at its position: an "
                                      "event that was never on the log")
                    continue
                matched = True
                if row[1] != leaf:
                    self._row_finding(offset, rank, "audit_differs", "its bytes are not the record's at its position "
                                      "in the log: the event was changed")
                elif row[3] is not None and (row[2] != tree or row[3] != index):  # None: the leaf at its position
                    self._row_finding(offset, rank, "leaf_index_wrong", f"it names leaf {row[3]} of tree {row[2]}, "
                                      f"the record is leaf {index} of tree {tree}")
            if not matched:
                self.unmatched.append((offset, value))
        self._row = at

    @property
    def root_differs(self) -> bool:
        """Does the stored tree hold leaves the log does not, or another root at its size?"""
        if self._differs is None:
            self._differs = self.limit is None and bool(self.stored_size) and (
                self.stored_size > self.size or self.root(self.stored_size) != self.stored_root)
        return self._differs

    def leaves_digest(self) -> tuple[bytes, bytes]:
        """SHA-256 over the first ``stored_size`` leaf hashes, and over their offsets (8 bytes each, big-endian):
        what ``tree_leaves_digest`` computes of the stored leaves, to tell a stored leaf changed under unchanged
        peaks without reading the leaves."""
        size = min(self.stored_size, self.size)
        offsets = array.array("q", self.offsets[:size])
        if sys.byteorder == "little":
            offsets.byteswap()
        return hashlib.sha256(b"".join(self.leaves[:size])).digest(), hashlib.sha256(offsets.tobytes()).digest()

    def first_leaf_differing(self, stored: Iterable[tuple[int, bytes, int | None]]) -> Finding | None:
        """The first of the stored leaves ((index, hash, offset) in order) that is not the record's."""
        for index, hash_, offset in stored:
            if index >= self.size or hash_ != self.leaves[index] or offset != self.offsets[index]:
                at = self.offsets[index] if index < self.size else offset
                return self._finding("tree_leaf_differs", at, f"leaf {index:,} of the stored tree is not the record "
                                     f"at offset {at}: the tree was rewritten")
        return None

    def finish(self, read_to: int) -> Iterator[Finding]:
        """The findings of the partition as a whole, after its last record (read to offset ``read_to``, exclusive);
        those of rows are ``row_findings``."""
        last, rank = -1, 0
        for row in self.rows[self._row:]:
            rank, last = (rank + 1 if row[0] == last else 0), row[0]
            if self.limit is None or (row[3] is not None and row[3] < self.limit):
                self._row_finding(row[0], rank, "audit_not_in_log", f"the log ends at offset {read_to}: an event that "
                                  "was never on the log")
        if not self.root_differs:
            return
        if self.stored_size > self.size:
            yield self._finding("tree_longer", read_to, f"the stored tree holds {self.stored_size:,} leaves, the "
                                f"log {self.size:,}: leaves that are no record of the log")
        else:
            yield self._finding("tree_root_differs", None, f"the stored tree's root at size {self.stored_size:,} is "
                                f"{self.stored_root.hex()}, the log's {self.root(self.stored_size).hex()}")

    @property
    def wrong_rows(self) -> list[int]:
        """The offsets of the rows found wrong: whose names ``row_findings`` needs."""
        return sorted({offset for offset, *_ in self._rows_found})

    def row_findings(self, names: Iterable[RowName]) -> list[Finding]:
        """The rows' findings (after ``finish``), each naming its event's stream, seq and id from ``names``
        (those at ``wrong_rows``, in the rows' order)."""
        by_offset: dict[int, list[RowName]] = {}
        for name in names:
            by_offset.setdefault(name[0], []).append(name)
        found = []
        for offset, rank, code, reason in self._rows_found:
            at = by_offset.get(offset, [])
            _, event_id, stream_id, seq = at[rank] if rank < len(at) else (offset, None, "", None)
            found.append(Finding(stream_id, seq, event_id, code, f"audit_log row at {self.topic} partition "
                                 f"{self.partition} offset {offset}: {reason}", self.partition, offset))
        return found

    def _finding(self, code: str, offset: int | None, reason: str) -> Finding:
        return Finding("", None, None, code, f"{self.topic} partition {self.partition}: {reason}", self.partition,
                       offset)

    def _row_finding(self, offset: int, rank: int, code: str, reason: str) -> None:
        self._rows_found.append((offset, rank, code, reason))
