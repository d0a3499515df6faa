"""Pydantic models of the runledger event (SPEC.md sections 2, 4, 5) and its parser.

``parse_event`` turns the bytes of a Kafka record (or an already decoded JSON
object) into a typed, hash-checked ``Event``, or raises one typed error from
``runledger.schemas.errors`` that names the field and the reason.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeAlias

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SkipValidation,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

from runledger.schemas.chain import MAX_SAFE_INTEGER, compute_hash, is_plain, unsafe_values
from runledger.schemas.errors import HashMismatch, InvalidEvent, InvalidJson, TooLarge, UnknownType

__all__ = [
    "EVENT_TYPES",
    "MAX_EVENT_BYTES",
    "STREAM_ID_PATTERN",
    "Event",
    "Money",
    "decode_event",
    "decode_json",
    "format_time",
    "parse_event",
    "validate_data",
    "validate_stream_id",
]

MAX_EVENT_BYTES = 512 * 1024
"""The largest encoded event, in bytes of UTF-8 JSON (SPEC.md section 4); larger is ``TooLarge``."""
STREAM_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,200}")
_MONEY = re.compile(r"(0|[1-9][0-9]*)(\.[0-9]{1,12})?")
_HEX64 = r"^[0-9a-f]{64}$"
_UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_TRACEPARENT = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"


def _money(value: object) -> Decimal:
    if not isinstance(value, str):
        raise ValueError(
            f"money must be a decimal string such as \"0.000125\", not a JSON {type(value).__name__}"
        )
    if not _MONEY.fullmatch(value):
        raise ValueError(f"{value!r} is not a non-negative decimal with at most 12 digits after the point")
    return Decimal(value)


def _utc_time(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 string such as \"2026-11-22T10:00:00.125Z\"")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an RFC 3339 date-time") from None
    if "T" not in value.upper() or parsed.tzinfo is None:
        raise ValueError(f"{value!r} is not an RFC 3339 date-time with a UTC offset")
    if parsed.utcoffset() != timedelta(0):
        raise ValueError(f"{value!r} is not in UTC (use Z or +00:00)")
    return parsed.astimezone(UTC)


def format_time(moment: datetime) -> str:
    """The RFC 3339 UTC form producers write: millisecond precision, ``Z`` suffix."""
    if moment.tzinfo is None:
        raise ValueError("time must be timezone-aware")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


Money = Annotated[Decimal, BeforeValidator(_money)]
"""A decimal string in JSON, a ``Decimal`` in Python; never a float."""
UtcTime = Annotated[datetime, BeforeValidator(_utc_time)]
Count = Annotated[StrictInt, Field(ge=0, le=MAX_SAFE_INTEGER)]
Name = Annotated[StrictStr, Field(min_length=1)]
JsonObject = dict[str, Any]


class _Data(BaseModel):
    # Unknown fields in data are kept (audit) and ignored (projections): SPEC.md section 5.
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


class ErrorInfo(_Data):
    type: Name
    message: StrictStr


class ExecutionStarted(_Data):
    workflow: Name
    agent_id: StrictStr | None = None
    customer_id: StrictStr | None = None
    input: JsonObject | None = None
    budget_usd: Money | None = None


class StepStarted(_Data):
    step_id: Name
    name: Name
    order: StrictInt | None = None
    input: JsonObject | None = None


class StepRetrying(_Data):
    step_id: Name
    attempt: Annotated[StrictInt, Field(ge=1)]
    max_retries: Count | None = None
    error: JsonObject | None = None


class StepCompleted(_Data):
    step_id: Name
    output: JsonObject | None = None


class StepFailed(_Data):
    step_id: Name
    error: ErrorInfo


class StepSkipped(_Data):
    step_id: Name
    reason: StrictStr | None = None


class CostIncurred(_Data):
    provider: Name
    model: Name
    input_tokens: Count
    output_tokens: Count
    cached_tokens: Count | None = None
    step_id: Name | None = None
    cost_usd: Money | None = None


class ArtifactCreated(_Data):
    artifact_id: Name
    type: Literal["report", "config", "log", "chart", "dataset", "model", "code", "other"]
    name: Name
    uri: Name
    step_id: Name | None = None
    size_bytes: Count | None = None
    content_type: StrictStr | None = None


class ExecutionCompleted(_Data):
    output: JsonObject | None = None


class ExecutionFailed(_Data):
    error: ErrorInfo


class ExecutionCancelled(_Data):
    reason: StrictStr | None = None


class ExecutionTimedOut(_Data):
    after_seconds: Annotated[StrictInt | float, Field(ge=0)] | None = None


EVENT_TYPES: dict[str, type[_Data]] = {
    "execution.started": ExecutionStarted,
    "step.started": StepStarted,
    "step.retrying": StepRetrying,
    "step.completed": StepCompleted,
    "step.failed": StepFailed,
    "step.skipped": StepSkipped,
    "cost.incurred": CostIncurred,
    "artifact.created": ArtifactCreated,
    "execution.completed": ExecutionCompleted,
    "execution.failed": ExecutionFailed,
    "execution.cancelled": ExecutionCancelled,
    "execution.timed_out": ExecutionTimedOut,
}
"""Every event type of SPEC.md section 5, with the model of its ``data``."""

EventData: TypeAlias = (
    ExecutionStarted | StepStarted | StepRetrying | StepCompleted | StepFailed | StepSkipped
    | CostIncurred | ArtifactCreated | ExecutionCompleted | ExecutionFailed | ExecutionCancelled
    | ExecutionTimedOut
)


def _subject(value: str) -> str:
    if not STREAM_ID_PATTERN.fullmatch(value):
        raise ValueError("must be 1 to 200 characters from A-Z a-z 0-9 . _ : -")
    return value


StreamId = Annotated[StrictStr, AfterValidator(_subject)]


class Event(BaseModel):
    """One event, validated: the CloudEvents envelope with its typed ``data``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    specversion: Literal["1.0"]
    id: Annotated[StrictStr, Field(pattern=_UUID)]
    source: Annotated[StrictStr, Field(min_length=1, pattern=r"^\S+$")]
    type: StrictStr
    subject: StreamId
    time: UtcTime
    datacontenttype: Literal["application/json"]
    seq: Annotated[StrictInt, Field(ge=1, le=MAX_SAFE_INTEGER)]
    prevhash: Annotated[StrictStr, Field(pattern=_HEX64)]
    hash: Annotated[StrictStr, Field(pattern=_HEX64)]
    # Validated by type before the envelope (``parse_event``); a union check here would cost more
    # than the rest of the envelope together.
    data: SkipValidation[EventData]
    dataschema: Annotated[StrictStr, Field(min_length=1)] | None = None
    traceparent: Annotated[StrictStr, Field(pattern=_TRACEPARENT)] | None = None


_DATA_ADAPTERS = {name: TypeAdapter(model) for name, model in EVENT_TYPES.items()}


def _field_errors(error: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for item in error.errors(include_url=False):
        path = ".".join(str(p) for p in item["loc"])
        reason = item["msg"].removeprefix("Value error, ")
        out.append((f"{prefix}{path}" if path else prefix.rstrip("."), reason))
    return out


def validate_stream_id(stream_id: object) -> str:
    """Return ``stream_id`` if it is a valid stream id (SPEC.md section 1), else raise InvalidEvent."""
    if not isinstance(stream_id, str) or not STREAM_ID_PATTERN.fullmatch(stream_id):
        raise InvalidEvent([("subject", f"stream id {stream_id!r} must be 1 to 200 characters from "
                                        "A-Z a-z 0-9 . _ : -")])
    return stream_id


def validate_data(event_type: object, data: object, *, plain: bool | None = None) -> EventData:
    """Validate the ``data`` of an event of ``event_type``; raise UnknownType or InvalidEvent, which
    also names any number JCS cannot canonicalise and any string or key containing U+0000.

    ``plain``: ``is_plain(data)`` if the caller already knows it.
    """
    if not isinstance(event_type, str) or event_type not in EVENT_TYPES:
        raise UnknownType([("type", f"unknown event type {event_type!r}; known: {', '.join(EVENT_TYPES)}")])
    if not isinstance(data, dict):
        raise InvalidEvent([("data", f"must be a JSON object, not {type(data).__name__}")])
    if not (plain if plain is not None else is_plain(data)):
        problems = [(f"data.{path}" if path else "data", reason) for path, reason in unsafe_values(data)]
        if problems:
            raise InvalidEvent(problems)
    try:
        return _DATA_ADAPTERS[event_type].validate_python(data)  # type: ignore[return-value]  # one of EventData
    except ValidationError as e:
        raise InvalidEvent(_field_errors(e, "data.")) from None


def decode_json(value: bytes | str) -> dict[str, Any]:
    """Decode one JSON object; raise InvalidJson (never a bare decoder error)."""
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise InvalidJson(f"not valid UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidJson(f"expected a JSON object, got a JSON {type(obj).__name__}")
    return obj


def decode_event(value: bytes | str) -> dict[str, Any]:
    """Decode one encoded event: TooLarge if it is over ``MAX_EVENT_BYTES``, else as ``decode_json``.

    The size is checked first, so an oversized record is refused without being parsed.
    """
    if isinstance(value, str):  # isascii is O(1) on a str: most text is counted without encoding it
        size = len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    else:
        size = len(value)
    if size > MAX_EVENT_BYTES:
        raise TooLarge([("", f"the encoded event is {size:,} bytes; at most {MAX_EVENT_BYTES:,} (512 KiB) are "
                             f"allowed: put larger content outside the log, named by an artifact.created uri")])
    return decode_json(value)


def parse_event(value: bytes | str | dict[str, Any], *, verify_hash: bool = True) -> Event:
    """Parse and validate one event.

    ``value`` is the record value from Kafka (bytes), JSON text, or an already
    decoded object (whose size is not checked: there are no bytes to count).
    Raises TooLarge, InvalidJson, UnknownType, InvalidEvent or HashMismatch;
    all are ``PermanentError``.
    """
    raw = value if isinstance(value, dict) else decode_event(value)
    try:
        plain = is_plain(raw)  # one walk serves the number and U+0000 checks and the hash
    except RecursionError:
        raise InvalidEvent([("data", "nested too deeply")]) from None
    data = validate_data(raw.get("type"), raw.get("data"), plain=plain or None)
    envelope = {k: v for k, v in raw.items() if k != "data"}
    problems = [] if plain else list(unsafe_values(envelope))
    if problems:
        raise InvalidEvent(problems)
    try:
        event = Event.model_validate({**envelope, "data": data})
    except ValidationError as e:
        raise InvalidEvent(_field_errors(e)) from None
    if verify_hash:
        try:
            expected = compute_hash(raw, plain=plain)
        except (TypeError, ValueError, RecursionError) as e:  # the encoders' depth limits
            raise InvalidEvent([("data", f"cannot be canonicalised: {e}")]) from None
        if expected != event.hash:
            raise HashMismatch(expected, event.hash)
    return event
