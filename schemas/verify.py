"""Checking stored events without trusting the tables: every hash and link recomputed from the events' bytes.

``ChainAuditor`` is fed stored events in stream and ``seq`` order (from ``audit_log``, or a log topic sorted
the same way) and reports, for each stream that is not intact, the first event where it stops being so and
why: bytes that are not JSON, or not I-JSON (an object with two members of one name), a hash that does not
match the bytes, columns that say something else than the bytes, a missing first event, a gap, a repeated
``seq``, a broken ``prevhash`` link, or a stream head (the tables' ``stream_heads``) that is not where the
stream ends. ``LogAuditor`` makes the same checks over the log topic's records as they come, streams
interleaved, out of ``seq`` order and with retried copies. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import msgspec

from runledger.schemas.chain import GENESIS_HASH, Head, stored_event
from runledger.schemas.errors import DuplicateMember

__all__ = ["ChainAuditor", "Finding", "LogAuditor", "LogEntry", "LogRecord", "StoredEvent"]


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
    code: str  # not_json | invalid_event | hash_mismatch | row_mismatch | first_missing | seq_gap | seq_duplicate
    #            | chain_broken | head_mismatch | head_missing | stream_missing; in the log topic: not_event
    #            | log_start_deleted; PostgreSQL against the log (runledger.schemas.logtrees): audit_differs
    #            | audit_not_in_log | leaf_index_wrong | record_unaccounted | tree_leaf_differs | tree_longer
    #            | tree_root_differs; the log against a checkpoint: log_shorter | root_mismatch
    reason: str
    partition: int | None = None  # where in the log topic, for a finding of the log's records
    offset: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"stream_id": self.stream_id, "seq": self.seq, "event_id": self.event_id, "code": self.code,
                "reason": self.reason, "partition": self.partition, "offset": self.offset}


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
            event, carried, computed = stored_event(row[2])
        except msgspec.DecodeError as e:
            return _found(row, "not_json", f"the stored bytes are not a JSON object: {e}")
        except DuplicateMember as e:
            return _found(row, "invalid_event", f"the stored event is not I-JSON: {e}")
        except (TypeError, ValueError, RecursionError) as e:
            return _found(row, "hash_mismatch", f"the stored event cannot be canonicalised: {e}")
        if carried != computed:
            return _found(row, "hash_mismatch", f"the event carries hash {carried}, its bytes hash to {computed}")
        stream_id, seq, _, event_id, hash_column, prevhash = row
        get = event.get
        linked = get("prevhash")
        if (stream_id != get("subject") or seq != get("seq") or (event_id is not None and event_id != get("id"))
                or (hash_column is not None and hash_column != computed)
                or (prevhash is not None and prevhash != linked)):
            return _row_mismatch(row, event, carried)
        if seq == self._seq + 1 and linked == self._hash:  # the usual case: the next event, linked
            self._seq, self._hash, self._last_id = seq, computed, event_id
            return None
        if seq == self._seq and seq > 0:
            return _found(row, "seq_duplicate", f"seq {seq} is stored twice (events {self._last_id} and "
                                                f"{event_id})")
        if self._seq == 0 and seq != 1:
            return _found(row, "first_missing", f"the stream starts at seq {seq}: seq 1 (execution.started) is "
                                                "missing")
        if seq != self._seq + 1:
            return _found(row, "seq_gap", f"seq {seq} follows seq {self._seq}: seq {self._seq + 1} is missing")
        return _found(row, "chain_broken", f"prevhash {linked} is not the hash {self._hash} of seq {self._seq}")

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


class LogRecord(Protocol):
    """What the log auditor reads of a record of the log topic: where it is, its key and its value (None for a
    record without one). An aiokafka ``ConsumerRecord`` has them: a verification reads millions, and copies
    none."""

    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class LogEntry(NamedTuple):
    """A LogRecord of its own, for records that do not come from aiokafka."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class _Held(NamedTuple):
    """An event that came before its predecessor: kept until the predecessor links, or reported at the end."""

    event_id: str | None
    hash: str
    prevhash: Any
    partition: int
    offset: int


class _Chain:
    """One stream of the log, as far as its events have linked."""

    __slots__ = ("broken", "hash", "hashes", "pending", "seq")

    def __init__(self) -> None:
        self.seq, self.hash = 0, GENESIS_HASH  # the last linked event
        # The digest of every linked event, seq n at [32 (n - 1), 32 n): a copy that comes after later events
        # (a producer retried a whole batch) is told from a fork only by the hash of the event it repeats.
        self.hashes = bytearray()
        self.pending: dict[int, _Held] = {}
        self.broken = False


class LogAuditor:
    """Feed it the log topic's records with ``check``, each partition's in offset order (streams interleaved, in
    any order of partitions); ``finish`` once at the end.

    A stream's events may come out of ``seq`` order (a worker parks one until its predecessor comes): an event
    is held until its predecessor links. An event may come more than once (a producer retries): a copy with the
    hash of the event seen at its ``seq`` is counted in ``duplicates``, not reported; another event at that
    ``seq`` is a fork. A stream is reported once, at its first problem, with the record's partition and offset;
    a record that is not an event belongs to no stream and is reported with stream id "". Memory: 32 bytes per
    linked event, and the events that wait for their predecessor.

    Counts: ``records`` read, ``events`` among them (copies included), ``duplicates`` among those, ``streams``.
    """

    def __init__(self) -> None:
        self.records = self.events = self.duplicates = self.streams = 0
        self._chains: dict[str, _Chain] = {}

    def check(self, records: Iterable[LogRecord]) -> Iterator[Finding]:
        for record in records:
            self.records += 1
            finding = self._check_record(record.partition, record.offset, record.key, record.value)
            if finding is not None:
                yield finding

    def finish(self) -> Iterator[Finding]:
        """Each stream with events that never linked: the first of them, and the ``seq`` that is missing."""
        for stream in sorted(s for s, c in self._chains.items() if c.pending and not c.broken):
            chain = self._chains[stream]
            seq = min(chain.pending)
            held = chain.pending[seq]
            if chain.seq == 0:
                yield _in_log(held.partition, held.offset, stream, seq, held.event_id, "first_missing",
                              f"the stream's first event in the log is seq {seq}: seq 1 (execution.started) is "
                              "not in the log")
            else:
                yield _in_log(held.partition, held.offset, stream, seq, held.event_id, "seq_gap",
                              f"seq {seq} never links: seq {chain.seq + 1} is not in the log (the stream is intact "
                              f"up to seq {chain.seq})")

    def _check_record(self, partition: int, offset: int, key: bytes | None, value: bytes | None) -> Finding | None:
        try:
            event, carried, computed = stored_event(value or b"")
            refused: tuple[str, str] | None = None
        except msgspec.DecodeError as e:
            return _in_log(partition, offset, "", None, None, "not_json",
                           f"the record (key {key!r}) is not a JSON object: {e}")
        except DuplicateMember as e:
            event, carried, computed = e.decoded or {}, None, ""
            refused = "invalid_event", f"the event is not I-JSON: {e}"
        except (TypeError, ValueError, RecursionError) as e:
            event, carried, computed = _decoded(value or b""), None, ""
            refused = "hash_mismatch", f"the event cannot be canonicalised: {e}"
        subject, seq, event_id = event.get("subject"), event.get("seq"), event.get("id")
        if type(subject) is not str or type(seq) is not int:
            return _in_log(partition, offset, "", None, None, "not_event",
                           f"the record (key {key!r}) is JSON but not an event: no string subject and integer seq")
        event_id = event_id if type(event_id) is str else None
        chain = self._chains.get(subject)
        if chain is None:
            chain = self._chains[subject] = _Chain()
            self.streams += 1
        self.events += 1
        if chain.broken:
            return None
        if refused is not None or carried != computed:
            code, reason = refused or ("hash_mismatch", f"the event carries hash {carried}, its bytes hash to "
                                                        f"{computed}")
            return self._break(chain, _in_log(partition, offset, subject, seq, event_id, code, reason))
        if seq < 1:
            return self._break(chain, _in_log(partition, offset, subject, seq, event_id, "chain_broken",
                                              f"seq {seq}: a stream's seq runs from 1"))
        if seq == chain.seq + 1:  # the common case first
            return self._link(chain, subject, seq, event_id, computed, event.get("prevhash"), partition, offset)
        fork = None
        if seq <= chain.seq:
            seen = chain.hashes[32 * (seq - 1):32 * seq].hex()
            if seen != computed:
                fork = f"the event linked at seq {seq} before hashes to {seen}"
        elif (held := chain.pending.get(seq)) is not None:
            if held.hash != computed:
                fork = (f"the event {held.event_id} at partition {held.partition} offset {held.offset} hashes to "
                        f"{held.hash}")
        else:
            chain.pending[seq] = _Held(event_id, computed, event.get("prevhash"), partition, offset)
            return None
        if fork is None:
            self.duplicates += 1
            return None
        return self._break(chain, _in_log(partition, offset, subject, seq, event_id, "seq_duplicate",
                                          f"seq {seq} is in the log twice with different content (a fork): this "
                                          f"event hashes to {computed}, {fork}"))

    def _link(self, chain: _Chain, stream: str, seq: int, event_id: str | None, computed: str, prevhash: Any,
              partition: int, offset: int) -> Finding | None:
        """Link the event that follows the chain's last, then each held event that follows it in turn."""
        while True:
            if prevhash != chain.hash:
                return self._break(chain, _in_log(partition, offset, stream, seq, event_id, "chain_broken",
                                                  f"prevhash {prevhash} is not the hash {chain.hash} of seq "
                                                  f"{chain.seq}"))
            chain.seq, chain.hash = seq, computed
            chain.hashes += bytes.fromhex(computed)
            if not chain.pending:
                return None
            held = chain.pending.pop(seq + 1, None)
            if held is None:
                return None
            seq += 1
            event_id, computed, prevhash, partition, offset = held

    def _break(self, chain: _Chain, finding: Finding) -> Finding:
        chain.broken = True
        chain.hashes, chain.pending = bytearray(), {}  # its later events are counted, not checked
        return finding


def _in_log(partition: int, offset: int, stream_id: str, seq: int | None, event_id: str | None, code: str,
            reason: str) -> Finding:
    return Finding(stream_id, seq, event_id, code, f"partition {partition} offset {offset}: {reason}", partition,
                   offset)


def _decoded(raw: bytes) -> dict[str, Any]:
    """The JSON object ``raw`` holds, for naming an event that cannot be hashed ({} if not even that)."""
    try:
        event = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return {}
    return event if type(event) is dict else {}
