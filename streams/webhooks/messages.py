"""Which events of the log each webhook endpoint is owed, and how a message travels between topics. Pure logic.

An endpoint is owed every event of the log that matches its filter and reached the log after the endpoint was
added (the record's Kafka timestamp at or after ``created_at``): a message, named by ``msg_id`` from the endpoint
and the event's hash, so that a record read twice, or copied twice into the log, is one message with one
``webhook-id`` for every attempt. A record that is not an event (the projection dead-letters it) is owed to no one,
and counted (``Skipped``).

A message that failed travels through ``<prefix>.webhooks.retry.<delay>`` and ends, dead, in
``<prefix>.webhooks.dlq``; its value is the event's bytes and its ``runledger.webhook.*`` headers say which message
and attempt it is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from runledger.projections.planner import decode
from runledger.projections.records import LogRecord
from runledger.streams.webhooks.endpoints import Filter

__all__ = ["HEADER", "EndpointView", "Message", "RetryCopy", "match", "msg_id", "read_retry_headers",
           "retry_headers"]

HEADER = "runledger.webhook."


def msg_id(endpoint_id: str, event_hash: str) -> str:
    """The ``webhook-id`` of an event's message to an endpoint: the same for every attempt and every copy."""
    return "msg_" + hashlib.sha256(f"{endpoint_id}\n{event_hash}".encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class EndpointView:
    """What matching needs of an endpoint. ``scope``: for one a source added, the stream-id prefixes that source
    may read now (none: nothing is delivered); None for one the owner added."""

    endpoint_id: str
    filter: Filter
    created_at: datetime
    scope: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """An event owed to an endpoint: a row of ``webhook_messages``."""

    msg_id: str
    endpoint_id: str
    stream_id: str
    seq: int
    event_id: str
    event_type: str
    event_hash: str
    event_time: datetime
    partition: int
    offset: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Skipped:
    """A record owed to no one because it is not an event: where it is, and why."""

    partition: int
    offset: int
    reason: str


def match(records: Iterable[tuple[LogRecord, datetime]], endpoints: Sequence[EndpointView]
          ) -> tuple[list[Message], list[Skipped]]:
    """The messages ``records`` (each with its Kafka timestamp) owe ``endpoints``, in log order, and the records
    that are no event."""
    messages: list[Message] = []
    skipped: list[Skipped] = []
    if not endpoints:
        return messages, skipped
    for record, appended in records:
        d = decode(record)
        if d.event is None:
            skipped.append(Skipped(record.partition, record.offset, d.error.code if d.error else "undecodable"))
            continue
        e = d.event
        for ep in endpoints:
            if (appended >= ep.created_at and ep.filter.matches(e.type, e.subject, e.source)
                    and (ep.scope is None or any(e.subject.startswith(p) for p in ep.scope))):
                messages.append(Message(msg_id(ep.endpoint_id, e.hash), ep.endpoint_id, e.subject, e.seq, e.id,
                                        e.type, e.hash, e.time, record.partition, record.offset, record.value))
    return messages, skipped


@dataclass(frozen=True, slots=True)
class RetryCopy:
    """What a retry-topic copy says: the message, the attempt it is due for, and when."""

    msg_id: str
    attempt: int
    due: datetime | None


def retry_headers(msg: str, endpoint_id: str, attempt: int, due: datetime | None, why: str) -> dict[str, str]:
    """The headers of a copy for a retry topic (``attempt``: the one it is due for, ``due``: when) or for the
    dead-letter topic (``attempt``: the attempts made, ``due`` None)."""
    values = {"msg_id": msg, "endpoint_id": endpoint_id, "attempt": str(attempt), "why": why}
    if due is not None:
        values["due"] = due.isoformat()
    return {HEADER + k: v for k, v in values.items()}


def read_retry_headers(headers: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> RetryCopy | None:
    """A retry-topic copy's message and attempt, or None for a message someone else wrote (it is skipped)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    h = {k[len(HEADER):]: v.decode("utf-8", "replace") for k, v in items if k.startswith(HEADER)}
    try:
        attempt = int(h["attempt"])
        msg = h["msg_id"]
    except (KeyError, ValueError):
        return None
    if not msg.startswith("msg_") or attempt < 1:
        return None
    try:
        due = datetime.fromisoformat(h["due"]) if "due" in h else None
    except ValueError:
        due = None
    if due is not None and due.tzinfo is None:
        due = None
    return RetryCopy(msg, attempt, due)
