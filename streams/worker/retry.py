"""The retry schedule, and the headers that carry a failed record's history between topics.

A record whose delivery failed for a transient reason goes to
``<prefix>.events.retry.<delay>`` (1s, 2s, 4s, 8s, 16s by default) and, when
the schedule runs out, to the dead letters; a permanent failure goes straight
to ``<prefix>.events.dlq``. The record value travels byte for byte; its history
travels in ``runledger.*`` headers (text, so that kcat and rpk show it):

    runledger.reason, runledger.error, runledger.attempts,
    runledger.first_failure, runledger.last_failure, runledger.due (retry only),
    runledger.original.topic, runledger.original.partition, runledger.original.offset,
    runledger.stream, runledger.seq, runledger.event_id, runledger.type (when known),
    runledger.claimed_stream (instead of runledger.stream: a record that does not prove its stream),
    runledger.dead_letter_id (dead-letter topic only)

Pure: knows nothing of Kafka clients or PostgreSQL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from runledger.projections.records import Failure, LogRecord, OutboxRow
from runledger.schemas.events import format_time

__all__ = ["HEADER", "RetrySchedule", "delay_name", "dlq_topic", "failure_headers", "from_retry_topic",
           "header_values", "message_time", "webhook_dlq_topic", "webhook_retry_topic"]

HEADER = "runledger."
Headers = list[tuple[str, bytes]]
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")  # Kafka's topic names
_MAX_ATTEMPTS = 1000


def delay_name(seconds: float) -> str:
    """A delay as it appears in a topic name: ``1s``, ``16s``, ``500ms``, ``2.5s``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def dlq_topic(prefix: str) -> str:
    return f"{prefix}.events.dlq"


def webhook_retry_topic(prefix: str, delay: float) -> str:
    """A retry topic of the webhook deliveries (``runledger.streams.webhooks``)."""
    return f"{prefix}.webhooks.retry.{delay_name(delay)}"


def webhook_dlq_topic(prefix: str) -> str:
    """The webhook deliveries' dead-letter topic."""
    return f"{prefix}.webhooks.dlq"


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """Where a record goes after its n-th failed delivery: ``delays[n - 1]``, then the dead letters."""

    prefix: str
    delays: tuple[float, ...]

    def __post_init__(self) -> None:
        if any(d <= 0 for d in self.delays):
            raise ValueError(f"retry_delays: every delay must be above 0 s, not {self.delays}")
        if len({delay_name(d) for d in self.delays}) != len(self.delays):
            raise ValueError(f"retry_delays: delays must differ, not {self.delays}")

    def topic(self, delay: float) -> str:
        return f"{self.prefix}.events.retry.{delay_name(delay)}"

    @property
    def topics(self) -> list[tuple[float, str]]:
        return [(d, self.topic(d)) for d in self.delays]

    @property
    def max_attempts(self) -> int:
        """Deliveries a record gets: the first, then one per retry topic."""
        return len(self.delays) + 1

    def route(self, retry: list[Failure], dead: list[Failure]) -> list[OutboxRow]:
        """The outbox rows (a ``runledger.projections.records.Route``) of ``retry``, one step along the schedule, and of
        ``dead``, to the dead-letter topic (their value is read from their letter's row)."""
        now = datetime.now(UTC)
        rows: list[OutboxRow] = []
        for f in retry:
            step = self.after(f.attempts)
            if step is None:
                raise ValueError(f"record at attempt {f.attempts} has no retry left")  # the store dead-letters it
            delay, topic = step
            headers = failure_headers(f, due=now + timedelta(seconds=delay))
            rows.append((topic, f.record.key, f.record.value, _text(headers), None))
        dlq = dlq_topic(self.prefix)
        rows += [(dlq, f.record.key, None, _text(failure_headers(f)), f.dead_letter_id) for f in dead]
        return rows

    def after(self, attempts: int) -> tuple[float, str] | None:
        """(delay, topic) for a record that has failed ``attempts`` times, or None when retries are used up."""
        if attempts > len(self.delays):
            return None
        delay = self.delays[attempts - 1]
        return delay, self.topic(delay)


def header_values(*, reason: str, error: str, attempts: int, first_failure: datetime, last_failure: datetime,
                  topic: str, partition: int, offset: int, stream: str | None = None, seq: int | None = None,
                  event_id: str | None = None, event_type: str | None = None, due: datetime | None = None,
                  dead_letter_id: int | None = None, claimed_stream: str | None = None) -> dict[str, str]:
    """The ``runledger.*`` headers as text, leaving out what is unknown (see the module docstring)."""
    fields: dict[str, object] = {
        "reason": reason, "error": error, "attempts": attempts, "first_failure": format_time(first_failure),
        "last_failure": format_time(last_failure), "due": format_time(due) if due is not None else None,
        "original.topic": topic, "original.partition": partition, "original.offset": offset,
        "stream": stream, "claimed_stream": claimed_stream, "seq": seq, "event_id": event_id, "type": event_type,
        "dead_letter_id": dead_letter_id,
    }
    return {HEADER + k: str(v) for k, v in fields.items() if v is not None}


def failure_headers(failure: Failure, *, due: datetime | None = None) -> Headers:
    """The headers of a record leaving for a retry topic (with ``due``) or the dead-letter topic."""
    r = failure.record
    values = header_values(
        reason=failure.error.code, error=failure.message, attempts=failure.attempts,
        first_failure=failure.first_failed, last_failure=failure.failed_at, topic=r.topic, partition=r.partition,
        offset=r.offset, stream=failure.stream_id, seq=failure.seq, event_id=failure.event_id,
        event_type=failure.event_type, due=due, dead_letter_id=failure.dead_letter_id,
        claimed_stream=failure.claimed_stream_id)
    return [(k, v.encode()) for k, v in values.items()]


def from_retry_topic(topic: str, partition: int, offset: int, key: bytes | None, value: bytes,
                     headers: Iterable[tuple[str, bytes]], timestamp: datetime,
                     delay: float) -> tuple[LogRecord, datetime]:
    """The record a retry-topic message carries, at its original position, and when it is due.

    Headers that are missing or unreadable (a message someone else wrote) fall back to
    the message itself: its own position, one failed attempt, due ``delay`` after it was written.
    """
    h = {k[len(HEADER):]: v.decode("utf-8", "replace") for k, v in headers if k.startswith(HEADER) and v}
    try:
        original = (h["original.topic"], int(h["original.partition"]), int(h["original.offset"]))
    except (KeyError, ValueError):
        original = (topic, partition, offset)
    # What PostgreSQL columns and Kafka can hold, or the message's own place: headers are input, not truth.
    if not (_TOPIC.fullmatch(original[0]) and 0 <= original[1] < 2**31 and 0 <= original[2] < 2**63):
        original = (topic, partition, offset)
    attempts = min(_int(h.get("attempts"), 1), _MAX_ATTEMPTS)
    first = _time(h.get("first_failure")) or timestamp
    due = _time(h.get("due")) or timestamp + timedelta(seconds=delay)
    return LogRecord(*original, key, value, attempts=attempts, first_failed=first), due


def _text(headers: Headers) -> dict[str, str]:
    return {k: v.decode() for k, v in headers}


def _int(text: str | None, default: int) -> int:
    try:
        return max(int(text), 1) if text is not None else default
    except ValueError:
        return default


def _time(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        parsed = datetime.fromisoformat(text)
        return (parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def message_time(timestamp_ms: int) -> datetime:
    """A Kafka timestamp (ms) as an aware UTC datetime; now if it is out of range."""
    try:
        return datetime.fromtimestamp(timestamp_ms / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return datetime.now(UTC)
