"""A stream's chain as a worker follows it through the log: pure, no I/O.

Recovery (``runledger.streams.producer.recovery``), ``runledger heads repair`` and ``heads check`` must put a
stream's head where a worker's projection ends, or an append forks the stream from the worker's point of view.
A worker applies a stream's events in ``seq`` order and, for equal ``seq``, in log order (partition, offset):
the first event at a seq that links to the head and may follow it (SPEC.md section 5's lifecycle) is projected;
a later one at that seq is a ``seq_conflict``; an event that does not link is ``chain_broken``; one that comes
before its predecessor waits for it. So the first branch in log order wins, whatever its hashes: a producer that
can write the log cannot choose the branch by grinding a hash that sorts first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from runledger.schemas.chain import Head
from runledger.schemas.errors import IllegalTransition, PermanentError
from runledger.schemas.events import parse_event
from runledger.schemas.lifecycle import check_lifecycle

__all__ = ["Chain", "LoggedEvent", "by_stream", "logged"]


class LoggedEvent(NamedTuple):
    """A valid event of the log, where the log holds it."""

    subject: str
    seq: int
    prevhash: str
    hash: str
    type: str
    partition: int
    offset: int


def logged(value: bytes, partition: int, offset: int) -> LoggedEvent | None:
    """The record as an event, or None if a worker would dead-letter it on sight (not JSON, not I-JSON, not a
    valid event, a wrong hash): such a record never was any stream's head."""
    try:
        event = parse_event(value)
    except PermanentError:
        return None
    return LoggedEvent(event.subject, event.seq, event.prevhash, event.hash, event.type, partition, offset)


def by_stream(events: Iterable[LoggedEvent]) -> dict[str, list[LoggedEvent]]:
    """``events`` by their stream, each stream's in the order given."""
    out: dict[str, list[LoggedEvent]] = {}
    for event in events:
        out.setdefault(event.subject, []).append(event)
    return out


def _worker_order(event: LoggedEvent) -> tuple[int, int, int]:
    return event.seq, event.partition, event.offset


@dataclass(slots=True)
class Chain:
    """A stream's first branch in the log, followed from ``head`` (whose last event is of ``type``; None: not
    known). ``branch``: seq -> hash of the events followed here; ``forks``: seqs at which the log holds another
    event than the one followed; ``waiting``: events that came before their predecessor, tried again as the
    chain is extended."""

    head: Head = field(default_factory=Head)
    type: str | None = None
    branch: dict[int, str] = field(default_factory=dict)
    forks: list[int] = field(default_factory=list)
    waiting: list[LoggedEvent] = field(default_factory=list)

    def extend(self, events: Iterable[LoggedEvent]) -> None:
        """Follow the chain through ``events`` (more of the stream's log, any order) as a worker would."""
        pending = sorted([*self.waiting, *events], key=_worker_order)
        for event in pending:
            if event.seq > self.head.seq + 1:
                break  # sorted by seq: this one and every later one wait for the gap to fill
            if event.seq <= self.head.seq or event.prevhash != self.head.hash:
                continue  # seq_conflict (or a copy), or chain_broken, for a worker
            try:
                check_lifecycle(event.subject, self.head.seq, self.type, [event.type])
            except IllegalTransition:
                continue  # dead-lettered by a worker: the seq stays free for another event
            self.head, self.type = Head(event.seq, event.hash), event.type
            self.branch[event.seq] = event.hash
        self.waiting = [e for e in pending if e.seq > self.head.seq + 1]
        self.forks += sorted({e.seq for e in pending if self.branch.get(e.seq, e.hash) != e.hash} - set(self.forks))
