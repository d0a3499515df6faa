"""The records a batch is made of, and what becomes of them: pure types shared by the store, the worker's Kafka
side and the operator tools, with no I/O (no PostgreSQL, no Kafka client)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from runledger.schemas.errors import PermanentError, RunledgerError

__all__ = ["BatchResult", "Failure", "LogRecord", "OutboxRow", "ProcessingFailed", "Route", "letter_stream", "pg_text"]


def pg_text(text: str, limit: int = 10_000) -> str:
    """``text`` as PostgreSQL ``text`` and ``jsonb`` accept it: U+0000 written out, at most ``limit`` characters."""
    text = text.replace("\x00", "\\u0000")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def letter_stream(stream_id: str | None, claimed_stream_id: str | None) -> str:
    """A dead letter's stream as people read it: the stream, or the one it only claims, or ``-``."""
    if stream_id is not None:
        return stream_id
    return f"{claimed_stream_id} (claimed)" if claimed_stream_id is not None else "-"


class ProcessingFailed(PermanentError):
    """runledger's own code failed on this record alone (a bug): it is dead-lettered as it is, to be replayed
    once the code is fixed, instead of stopping every stream behind it."""

    code = "processing_failed"


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One record: where it was read from the log, its bytes, and its failed deliveries so far.

    A record from a retry topic keeps its original log position; ``attempts`` counts
    the deliveries that failed, ``first_failed`` when the first did. A record being
    replayed from the dead letters carries its letter's ``dead_letter_id``.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    attempts: int = 0
    first_failed: datetime | None = None
    dead_letter_id: int | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """A record that leaves the batch unprojected, with what is known of its event.

    ``stream_id`` is the stream the record belongs to: a valid event's, or one its hash proves
    (``runledger.schemas.events.proven_stream``); its dead letter blocks that stream. ``claimed_stream_id`` is the
    subject (or key) of a record that proves nothing: kept to find its letter by, never to block a stream with.
    """

    record: LogRecord
    error: RunledgerError
    failed_at: datetime
    stream_id: str | None = None
    seq: int | None = None
    event_id: str | None = None
    event_type: str | None = None
    dead_letter_id: int | None = None  # set once the letter row exists
    claimed_stream_id: str | None = None

    @property
    def attempts(self) -> int:
        return self.record.attempts + 1

    @property
    def first_failed(self) -> datetime:
        return self.record.first_failed or self.failed_at

    @property
    def message(self) -> str:
        """The error message as PostgreSQL and Kafka headers can carry it (no U+0000, bounded)."""
        return pg_text(str(self.error))


OutboxRow = tuple[str, bytes | None, bytes | None, dict[str, str], int | None]
"""(topic, key, value, headers, dead letter id) of a copy to publish after commit; a dead letter's copy has no
value here (it is read from its row)."""

Route = Callable[[list[Failure], list[Failure]], list[OutboxRow]]
"""Where (to retry, dead letters) go: the outbox rows of their copies. Pure; runs inside the transaction."""


@dataclass(slots=True)
class BatchResult:
    """What a batch did: the events projected, counts by outcome, what left it, and rows written per table."""

    projected: list[tuple[str, int]] = field(default_factory=list)
    duplicates: int = 0
    parked: int = 0
    dead: list[Failure] = field(default_factory=list)
    retry: list[Failure] = field(default_factory=list)
    rows: Counter[str] = field(default_factory=Counter)
    cost_usd: Decimal = Decimal(0)
    times: list[datetime] = field(default_factory=list)  # of the events projected, in the same order
    lock_wait_s: float = 0.0  # in the statements that take the batch's locks (``projections.postgres.db.LockWaits``)
    # PostgreSQL transactions begun for the batch, rolled back ones included: 1, unless a record PostgreSQL refused
    # was isolated by applying halves, or a conflict was retried.
    transactions: int = 0

    @property
    def rejected(self) -> Counter[str]:
        """Dead letters by reason code."""
        return Counter(f.error.code for f in self.dead)

    def merge(self, other: BatchResult) -> BatchResult:
        """Both results as one (a batch applied in parts)."""
        return BatchResult(self.projected + other.projected, self.duplicates + other.duplicates,
                           self.parked + other.parked, self.dead + other.dead, self.retry + other.retry,
                           self.rows + other.rows, self.cost_usd + other.cost_usd, self.times + other.times,
                           self.lock_wait_s + other.lock_wait_s, self.transactions + other.transactions)
