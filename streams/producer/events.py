"""The events of an append, checked and chained without any I/O: ``NewEvent`` (what a caller appends),
``check_new_events`` (refused before anything is reserved or sent) and ``build_events`` (seq, prevhash, id and
hash assigned after a head, encoded as they are published)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from runledger.schemas.chain import Head, compute_hash
from runledger.schemas.errors import InvalidEvent, TooLarge
from runledger.schemas.events import MAX_EVENT_BYTES, format_time, parse_event, validate_data, validate_stream_id
from runledger.streams.producer.heads import AppendRef, StagedBatch

__all__ = ["NewEvent", "build_events", "check_new_events"]


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append: its type and data; ``seq``, ``prevhash``, ``id`` and ``hash`` are assigned."""

    type: str
    data: Mapping[str, Any]
    idempotency_key: str | None = None
    time: datetime | None = None
    id: str | None = None  # the event's id, if its producer chose it (a UUID, SPEC.md section 2); else a new one


def _wire_data(data: Mapping[str, Any]) -> dict[str, Any]:
    """Python callers may pass money as Decimal; on the wire it is a decimal string (SPEC.md 4)."""
    def convert(value: Any) -> Any:
        if isinstance(value, Decimal):
            return format(value, "f")
        if isinstance(value, Mapping):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [convert(v) for v in value]
        return value
    return convert(data)  # type: ignore[no-any-return]


def check_new_events(stream_id: object, events: Sequence[NewEvent]) -> None:
    """Validate before anything is reserved or sent: raise InvalidEvent (or TooLarge) naming the field."""
    validate_stream_id(stream_id)
    keys = [e.idempotency_key for e in events if e.idempotency_key is not None]
    if len(keys) != len(set(keys)):
        raise InvalidEvent([("idempotency_key", "repeated within one batch")])
    for event in events:
        data = _wire_data(event.data)
        validate_data(event.type, data)
        try:
            size = len(orjson.dumps(data))  # a lower bound of the event's size: the envelope only adds
        except orjson.JSONEncodeError as e:
            raise InvalidEvent([("data", f"cannot be encoded as JSON: {e}")]) from None
        if size > MAX_EVENT_BYTES:
            raise TooLarge([("data", f"encodes to {size:,} bytes; an event is at most {MAX_EVENT_BYTES:,} "
                                     f"(512 KiB): put larger content outside the log, named by an "
                                     f"artifact.created uri")])
        if event.time is not None and event.time.tzinfo is None:
            raise InvalidEvent([("time", "must be timezone-aware (UTC)")])


def build_events(source: str, stream_id: str, head: Head, events: Sequence[NewEvent]) -> StagedBatch:
    """Chain ``events`` after ``head``: assign seq, prevhash, id and hash; validate each as a worker would."""
    values, refs = [], []
    seq, prevhash = head.seq, head.hash
    now = format_time(datetime.now(UTC))
    for event in events:
        seq += 1
        raw: dict[str, Any] = {
            "specversion": "1.0",
            "id": event.id or str(uuid.uuid4()),
            "source": source,
            "type": event.type,
            "subject": stream_id,
            "time": format_time(event.time) if event.time else now,
            "datacontenttype": "application/json",
            "seq": seq,
            "prevhash": prevhash,
            "data": _wire_data(event.data),
        }
        raw["hash"] = prevhash = compute_hash(raw)
        parse_event(raw, verify_hash=False)  # what a worker would refuse is never published
        value = orjson.dumps(raw)
        if len(value) > MAX_EVENT_BYTES:  # a worker would dead-letter it; raised before anything is staged
            raise TooLarge([("", f"stream {stream_id!r} seq {seq}: the encoded event is {len(value):,} bytes; at "
                                 f"most {MAX_EVENT_BYTES:,} (512 KiB) are allowed: put larger content outside "
                                 f"the log, named by an artifact.created uri")])
        values.append(value)
        refs.append(AppendRef(seq, raw["id"], prevhash))
    return StagedBatch(uuid.uuid4().hex, values, refs, [e.idempotency_key for e in events],
                       events[-1].type if events else "")
