"""Checking stored events without trusting the tables: every hash and link recomputed from the events' bytes.

``ChainAuditor`` is fed stored events in stream and ``seq`` order (from ``audit_log``, or a log topic sorted
the same way) and reports, for each stream that is not intact, the first event where it stops being so and
why: bytes that are not JSON, a hash that does not match the bytes, columns that say something else than the
bytes, a missing first event, a gap, a repeated ``seq``, a broken ``prevhash`` link, or a stream head (the
tables' ``stream_heads``) that is not where the stream ends. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec

from runledger.schemas.chain import GENESIS_HASH, Head, stored_hash
from runledger.schemas.checkpoint import Checkpoint
from runledger.schemas.merkle import TreeState, leaf_hash

__all__ = ["ChainAuditor", "Finding", "StoredEvent", "TreeAuditor"]


class StoredEvent(NamedTuple):
    """One stored event: what its row's columns say, and its bytes. Columns a source does not have are None.

    The auditor reads it by position, so any row with these columns in this order will do (an asyncpg
    ``Record`` of ``verify_audit``): a verification reads millions, and builds no object for each.
    """

    stream_id: str
    seq: int
    raw: bytes
    event_id: str | None = None
    hash: str | None = None
    prevhash: str | None = None


@dataclass(frozen=True, slots=True)
class Finding:
    """Where a stream stops being intact, and why (SPEC.md section 3)."""

    stream_id: str  # "" for the log as a whole
    seq: int | None
    event_id: str | None
    code: str  # not_json | hash_mismatch | row_mismatch | first_missing | seq_gap | seq_duplicate | chain_broken
    #            | head_mismatch | head_missing | stream_missing; against a checkpoint: leaf_missing | leaf_changed
    #            | log_shorter | root_mismatch
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"stream_id": self.stream_id, "seq": self.seq, "event_id": self.event_id, "code": self.code,
                "reason": self.reason}


class ChainAuditor:
    """Feed it stored events in (stream, seq) order with ``check``; ``finish`` once at the end.

    ``heads``: where the tables say each stream ends (None: not checked). A stream is reported once, at its
    first problem; the events after it are counted, not checked.
    """

    def __init__(self, heads: Mapping[str, Head] | None = None) -> None:
        self.events = self.streams = 0
        self._heads = heads
        self._seen: set[str] = set()
        self._stream: str | None = None
        self._seq, self._hash = 0, GENESIS_HASH  # the stream's last intact event
        self._last_id: str | None = None
        self._broken = False

    def check(self, rows: Iterable[StoredEvent]) -> Iterator[Finding]:
        count = 0
        for row in rows:
            count += 1
            if row[0] != self._stream:
                yield from self._end_stream()
                self._start_stream(row[0])
            elif self._broken:
                continue
            finding = self._check_row(row)
            if finding is not None:
                self._broken = True
                yield finding
        self.events += count

    def finish(self) -> Iterator[Finding]:
        """The last stream's end, and every stream the heads name that had no event at all."""
        yield from self._end_stream()
        self._stream = None
        for stream, head in sorted((self._heads or {}).items()):
            if stream not in self._seen:
                yield Finding(stream, head.seq, None, "stream_missing",
                              f"stream_heads has it at seq {head.seq}, but no event of it is stored")

    def _start_stream(self, stream: str) -> None:
        if stream in self._seen:
            raise ValueError(f"stream {stream!r} comes twice: the events must be sorted by stream and seq")
        self._seen.add(stream)
        self.streams += 1
        self._stream, self._seq, self._hash, self._last_id, self._broken = stream, 0, GENESIS_HASH, None, False

    def _check_row(self, row: StoredEvent) -> Finding | None:
        try:
            event, carried, computed = stored_hash(row[2])
        except msgspec.DecodeError as e:
            return _found(row, "not_json", f"the stored bytes are not a JSON object: {e}")
        except (TypeError, ValueError, RecursionError) as e:
            return _found(row, "hash_mismatch", f"the stored event cannot be canonicalised: {e}")
        if carried != computed:
            return _found(row, "hash_mismatch", f"the event carries hash {carried}, its bytes hash to {computed}")
        stream_id, seq, _, event_id, hash_column, prevhash = row
        if (stream_id != event.get("subject") or seq != event.get("seq") or event_id not in (None, event.get("id"))
                or hash_column not in (None, computed) or prevhash not in (None, event.get("prevhash"))):
            return _row_mismatch(row, event, carried)
        if seq == self._seq and seq > 0:
            return _found(row, "seq_duplicate", f"seq {seq} is stored twice (events {self._last_id} and "
                                                f"{event_id})")
        if self._seq == 0 and seq != 1:
            return _found(row, "first_missing", f"the stream starts at seq {seq}: seq 1 (execution.started) is "
                                                "missing")
        if seq != self._seq + 1:
            return _found(row, "seq_gap", f"seq {seq} follows seq {self._seq}: seq {self._seq + 1} is missing")
        if event.get("prevhash") != self._hash:
            return _found(row, "chain_broken", f"prevhash {event.get('prevhash')} is not the hash {self._hash} of "
                                               f"seq {self._seq}")
        self._seq, self._hash, self._last_id = seq, computed, event_id
        return None

    def _end_stream(self) -> Iterator[Finding]:
        stream = self._stream
        if stream is None or self._broken or self._heads is None:
            return
        head, last = self._heads.get(stream), Head(self._seq, self._hash)
        if head is None:
            yield Finding(stream, None, None, "head_missing",
                          f"events up to seq {last.seq} are stored, but stream_heads has no row for the stream")
        elif head != last:
            where = (f"events after seq {last.seq} are missing" if head.seq > last.seq else
                     f"seq {head.seq + 1}..{last.seq} are stored beyond it" if head.seq < last.seq else
                     f"its hash is {head.hash}, the stored seq {last.seq} hashes to {last.hash}")
            yield Finding(stream, last.seq, self._last_id, "head_mismatch",
                          f"stream_heads says the stream ends at seq {head.seq}: {where}")


def _found(row: StoredEvent, code: str, reason: str) -> Finding:
    return Finding(row[0], row[1], row[3], code, reason)


def _row_mismatch(row: StoredEvent, event: dict[str, Any], carried: Any) -> Finding:
    for column, value, stored in zip(StoredEvent._fields, row, (event.get("subject"), event.get("seq"), None,
                                                                event.get("id"), carried, event.get("prevhash")),
                                     strict=True):
        if column != "raw" and value is not None and value != stored:
            return _found(row, "row_mismatch", f"column {column} is {value!r}, the event's bytes say {stored!r}")
    raise AssertionError("called for a row whose columns all match")


class TreeAuditor:
    """Recomputes the transparency log's tree up to a checkpoint's size from the stored events' bytes and
    compares the root with the checkpoint's. Feed it (leaf index, stream, seq, event id, bytes, stored leaf
    hash or None) in leaf order with ``check``; ``finish`` says whether the log is the one signed.

    A root that differs says the log before the checkpoint was changed: rewritten, reordered or cut. The first
    leaf whose bytes no longer give the leaf hash the tree stored names where, unless the tree was rewritten too.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.events = 0
        self._tree = TreeState()
        self._first_changed: Finding | None = None
        self._cut = False  # leaves are missing: no root can be compared

    def check(self, rows: Iterable[tuple[int, str, int, str, bytes, bytes | None]]) -> Iterator[Finding]:
        for index, stream_id, seq, event_id, raw, stored in rows:
            if index >= self.checkpoint.size:
                return
            self.events += 1
            if not self._cut and index != self._tree.size:
                self._cut = True
                yield Finding(stream_id, seq, event_id, "leaf_missing",
                              f"leaves {self._tree.size}..{index - 1} of the checkpoint's log are not stored: "
                              "events were deleted")
            try:
                _, carried, computed = stored_hash(raw)
            except (msgspec.DecodeError, TypeError, ValueError, RecursionError) as e:
                yield Finding(stream_id, seq, event_id, "not_json", f"leaf {index}: the stored bytes: {e}")
                computed = carried = ""
            if carried != computed:
                yield Finding(stream_id, seq, event_id, "hash_mismatch",
                              f"leaf {index}: the event carries hash {carried}, its bytes hash to {computed}")
            leaf = leaf_hash(bytes.fromhex(computed)) if computed else b""
            if stored is not None and stored != leaf and self._first_changed is None:
                self._first_changed = Finding(stream_id, seq, event_id, "leaf_changed",
                                              f"leaf {index}: the event's bytes no longer give the leaf the tree "
                                              "stored when it was appended")
            if not self._cut:
                self._tree.append(leaf)

    def finish(self) -> Iterator[Finding]:
        size, root = self.checkpoint.size, self.checkpoint.root
        if self._cut:
            return
        if self._tree.size < size:
            yield Finding("", None, None, "log_shorter", f"the log holds {self._tree.size:,} leaves, the checkpoint "
                                                         f"signed {size:,}: events were deleted")
        elif self._tree.root() != root:
            if self._first_changed is not None:
                yield self._first_changed
            yield Finding("", None, None, "root_mismatch",
                          f"the first {size:,} leaves have root {self._tree.root().hex()}, the checkpoint signed "
                          f"{root.hex()}: the log before it was rewritten")
