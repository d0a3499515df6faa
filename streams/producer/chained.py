"""Events chained by their producer (``seq``, ``prevhash`` and ``hash`` set), published as they are: checked in full
and against the stream's head, without any I/O (``runledger.streams.producer.client`` takes the lease and reads the
head)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from runledger.schemas.chain import Head, link_error
from runledger.schemas.errors import InvalidEvent, PermanentError, TooLarge
from runledger.schemas.events import MAX_EVENT_BYTES, parse_event, validate_stream_id
from runledger.schemas.lifecycle import check_lifecycle
from runledger.streams.producer.heads import AppendRef, StagedBatch

__all__ = ["ChainConflict", "chain_batch", "check_chained"]


class ChainConflict(PermanentError):
    """Events chained by their producer do not link to the stream's head: their ``seq`` is not the head's + 1, or their
    ``prevhash`` not the head's hash (another producer appended first, or the producer's idea of the head is stale).
    Nothing was published. Read the stream's head, chain the events on it again, and send them again."""

    code = "chain_conflict"

    def __init__(self, stream_id: str, head: Head, seq: object, reason: str) -> None:
        self.stream_id, self.head, self.seq = stream_id, head, seq
        super().__init__(f"stream {stream_id!r}: the event at seq {seq} does not link to the head (seq {head.seq}, "
                         f"hash {head.hash}): {reason}")


def check_chained(stream_id: str, events: Sequence[Mapping[str, Any]]) -> list[bytes]:
    """Validate each event as a worker would (its hash must verify) and as one of ``stream_id``; return each one
    encoded as it is published. Raises InvalidEvent (``index``-less: the first failed event), UnknownType, TooLarge
    or HashMismatch."""
    validate_stream_id(stream_id)
    values = []
    for event in events:
        raw = dict(event)
        parse_event(raw)
        if raw["subject"] != stream_id:
            raise InvalidEvent([("subject", f"{raw['subject']!r} is not the stream {stream_id!r} appended to")])
        value = orjson.dumps(raw)
        if len(value) > MAX_EVENT_BYTES:
            raise TooLarge([("", f"the encoded event is {len(value):,} bytes; at most {MAX_EVENT_BYTES:,} (512 KiB) "
                                 "are allowed: put larger content outside the log, named by an artifact.created uri")])
        values.append(value)
    return values


def chain_batch(stream_id: str, head: Head, last_type: str | None,
                fresh: Sequence[tuple[Mapping[str, Any], bytes, str | None]]) -> StagedBatch:
    """The batch of ``fresh`` (event, its encoding, its idempotency key) if they link to ``head`` one after the other
    and may follow the stream's last event (``last_type``); else ChainConflict or IllegalTransition."""
    at = head
    for event, _, _ in fresh:
        error = link_error(at, event)
        if error is not None:
            raise ChainConflict(stream_id, head, event.get("seq"), error[1])
        at = Head(event["seq"], event["hash"])
    check_lifecycle(stream_id, head.seq, last_type or None, [e["type"] for e, _, _ in fresh])
    return StagedBatch(uuid.uuid4().hex, [v for _, v, _ in fresh],
                       [AppendRef(e["seq"], e["id"], e["hash"]) for e, _, _ in fresh], [k for _, _, k in fresh],
                       fresh[-1][0]["type"] if fresh else "")
