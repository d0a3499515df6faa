"""The runledger event (SPEC.md sections 2, 4, 5) as msgspec structs, and its parser.

``parse_event`` turns the bytes of a Kafka record (or an already decoded JSON
object) into a typed, hash-checked ``Event``, or raises one typed error from
``runledger.schemas.errors`` that names every failed field and the reason.

msgspec checks a valid event in one pass in C; the Python callbacks run only for
the values whose rules are the spec's own (money, times, error objects). When
that pass refuses an event, ``_field_errors`` checks it field by field against
the same structs, so the error lists every failed field rather than the first.
"""

from __future__ import annotations

import re
import typing
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

import msgspec
import orjson
from msgspec import Meta, Struct

from runledger.schemas.chain import MAX_SAFE_INTEGER, compute_hash, is_plain, unsafe_values
from runledger.schemas.errors import (
    DuplicateMember,
    FieldError,
    HashMismatch,
    InvalidEvent,
    InvalidJson,
    TooLarge,
    UnknownType,
)
from runledger.schemas.ijson import duplicate_members, encoded_colons
from runledger.schemas.times import UtcTime, format_time, parse_utc_time

__all__ = [
    "EVENT_TYPES",
    "MAX_EVENT_BYTES",
    "STREAM_ID_PATTERN",
    "ErrorInfo",
    "Event",
    "EventData",
    "MAX_ID_CHARS",
    "Money",
    "UtcTime",
    "decode_event",
    "decode_json",
    "format_time",
    "parse_event",
    "proven_stream",
    "validate_data",
    "validate_stream_id",
]

MAX_EVENT_BYTES = 512 * 1024
"""The largest encoded event, in bytes of UTF-8 JSON (SPEC.md section 4); larger is ``TooLarge``."""
MAX_ID_CHARS = 200
"""The most characters of a stream id and of an identifier inside ``data`` (SPEC.md sections 1 and 4)."""
STREAM_ID_PATTERN = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_ID_CHARS}}}")
_STREAM_ID_RULE = f"1 to {MAX_ID_CHARS} characters from A-Z a-z 0-9 . _ : -"
_IDENTIFIER_RULE = f"must be 1 to {MAX_ID_CHARS} characters (SPEC.md section 4)"
_MONEY = re.compile(r"(0|[1-9][0-9]*)(\.[0-9]{1,12})?")
# \Z, not $: Python's $ also matches before a final newline.
_HEX64 = r"^[0-9a-f]{64}\Z"
_UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z"
_TRACEPARENT = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z"


class Money(Decimal):
    """A decimal string in JSON (at most 12 digits after the point), a ``Decimal`` in Python; never a float."""

    __slots__ = ()


class ErrorInfo(dict[str, Any]):
    """An error object: a non-empty string ``type`` and a string ``message``; other members are kept."""


class _ErrorShape(Struct):
    type: Annotated[str, Meta(min_length=1)]
    message: str


def _money(value: object) -> Money:
    if not isinstance(value, str):
        raise ValueError(
            f"money must be a decimal string such as \"0.000125\", not a JSON {type(value).__name__}"
        )
    if not _MONEY.fullmatch(value):
        raise ValueError(f"{value!r} is not a non-negative decimal with at most 12 digits after the point")
    return Money(value)


def _error_info(value: object) -> ErrorInfo:
    msgspec.convert(value, _ErrorShape, strict=True)
    assert isinstance(value, dict)  # _ErrorShape accepts only an object
    return ErrorInfo(value)


_HOOKS: dict[type, typing.Callable[[object], object]] = {Money: _money, UtcTime: parse_utc_time,
                                                          ErrorInfo: _error_info}


def _decode_hook(kind: type, value: object) -> object:
    """msgspec's callback for the types whose rules are the spec's own."""
    try:
        hook = _HOOKS[kind]
    except KeyError:
        raise NotImplementedError(kind) from None
    return hook(value)


Count = Annotated[int, Meta(ge=0, le=MAX_SAFE_INTEGER)]
Name = Annotated[str, Meta(min_length=1)]
Identifier = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]
"""An identifier inside ``data`` (workflow, agent_id, customer_id, step_id, artifact_id, provider, model): PostgreSQL
indexes them, and refuses an index entry over about 2.7 KB; checked here, so the database never sees a longer one."""
JsonObject = dict[str, Any]


class _Data(Struct, frozen=True):
    """The ``data`` of one event type. Unknown fields are ignored here (projections) and kept in the event's
    bytes (audit): SPEC.md section 5."""


class ExecutionStarted(_Data, frozen=True):
    workflow: Identifier
    agent_id: Identifier | None = None
    customer_id: Identifier | None = None
    input: JsonObject | None = None
    budget_usd: Money | None = None


class StepStarted(_Data, frozen=True):
    step_id: Identifier
    name: Name
    order: int | None = None
    input: JsonObject | None = None


class StepRetrying(_Data, frozen=True):
    step_id: Identifier
    attempt: Annotated[int, Meta(ge=1)]
    max_retries: Count | None = None
    error: JsonObject | None = None


class StepCompleted(_Data, frozen=True):
    step_id: Identifier
    output: JsonObject | None = None


class StepFailed(_Data, frozen=True):
    step_id: Identifier
    error: ErrorInfo


class StepSkipped(_Data, frozen=True):
    step_id: Identifier
    reason: str | None = None


class CostIncurred(_Data, frozen=True):
    provider: Identifier
    model: Identifier
    input_tokens: Count
    output_tokens: Count
    cached_tokens: Count | None = None
    step_id: Identifier | None = None
    cost_usd: Money | None = None


class ArtifactCreated(_Data, frozen=True):
    artifact_id: Identifier
    type: Literal["report", "config", "log", "chart", "dataset", "model", "code", "other"]
    name: Name
    uri: Name
    step_id: Identifier | None = None
    size_bytes: Count | None = None
    content_type: str | None = None


class ExecutionCompleted(_Data, frozen=True):
    output: JsonObject | None = None


class ExecutionFailed(_Data, frozen=True):
    error: ErrorInfo


class ExecutionCancelled(_Data, frozen=True):
    reason: str | None = None


class ExecutionTimedOut(_Data, frozen=True):
    after_seconds: Annotated[int, Meta(ge=0)] | Annotated[float, Meta(ge=0)] | None = None


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
"""Every event type of SPEC.md section 5, with the struct of its ``data``."""

EventData: TypeAlias = (
    ExecutionStarted | StepStarted | StepRetrying | StepCompleted | StepFailed | StepSkipped
    | CostIncurred | ArtifactCreated | ExecutionCompleted | ExecutionFailed | ExecutionCancelled
    | ExecutionTimedOut
)


class Event(Struct, frozen=True, forbid_unknown_fields=True):
    """One event, validated: the CloudEvents envelope with its typed ``data``."""

    specversion: Literal["1.0"]
    id: Annotated[str, Meta(pattern=_UUID)]
    source: Annotated[str, Meta(min_length=1, pattern=r"^\S+\Z")]
    type: str
    subject: Annotated[str, Meta(pattern=rf"^{STREAM_ID_PATTERN.pattern}\Z")]
    time: UtcTime
    datacontenttype: Literal["application/json"]
    seq: Annotated[int, Meta(ge=1, le=MAX_SAFE_INTEGER)]
    prevhash: Annotated[str, Meta(pattern=_HEX64)]
    hash: Annotated[str, Meta(pattern=_HEX64)]
    # The envelope is checked with ``data`` as it is; ``data`` is checked by its ``type`` (a union of structs
    # is untagged here: the tag is outside them) and set afterwards.
    if TYPE_CHECKING:
        data: EventData
    else:
        data: Any
    dataschema: Annotated[str, Meta(min_length=1)] | None = None
    traceparent: Annotated[str, Meta(pattern=_TRACEPARENT)] | None = None


_PATTERN_REASONS = {
    "id": "must be a UUID in lowercase hex form, such as 0b9e4a52-8e55-4d7e-9f7a-1f0c2b3d4e5f",
    "source": "must be a URI-reference, without white space",
    "subject": f"must be {_STREAM_ID_RULE}",
    "prevhash": "must be 64 lowercase hex characters",
    "hash": "must be 64 lowercase hex characters",
    "traceparent": "must be a W3C traceparent, such as 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
}
_AT = re.compile(r"^(?P<reason>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_FIELD = re.compile(r"^Object (?P<what>missing required|contains unknown) field `(?P<name>[^`]*)`$")


def _located(path: str, error: msgspec.ValidationError, kind: object) -> FieldError:
    """(field path, reason) from msgspec's error about the value at ``path`` of type ``kind``."""
    match = _AT.match(str(error))
    assert match is not None  # the pattern matches any text
    reason, inner = match["reason"], match["path"] or ""
    path += inner
    field = _FIELD.match(reason)
    if field is not None:
        path = f"{path}.{field['name']}" if path else field["name"]
        reason = "field required" if field["what"] == "missing required" else "unknown field: not allowed"
    elif reason.startswith("Expected `str` matching regex"):
        reason = _PATTERN_REASONS.get(path, reason)
    elif reason.startswith("Expected `str` of length") and Identifier in (kind, *typing.get_args(kind)):
        reason = _IDENTIFIER_RULE
    elif reason.startswith("Invalid enum value"):
        literal = next((a for a in typing.get_args(kind) if typing.get_origin(a) is Literal), kind)
        reason = f"{reason}: must be one of {', '.join(map(repr, typing.get_args(literal)))}"
    return path, reason


def _field_errors(kind: type[Struct], obj: dict[str, Any], prefix: str) -> list[FieldError]:
    """Every field of ``obj`` that ``kind`` refuses, with its reason (msgspec stops at the first)."""
    errors: list[FieldError] = []
    fields = msgspec.structs.fields(kind)
    for field in fields:
        if field.encode_name not in obj:
            if field.required:
                errors.append((f"{prefix}{field.name}", "field required"))
            continue
        try:
            msgspec.convert(obj[field.encode_name], field.type, strict=True, dec_hook=_decode_hook)
        except msgspec.ValidationError as e:
            value = obj[field.encode_name]
            if field.type is ErrorInfo and isinstance(value, dict):  # every member's error, not the first
                errors += _field_errors(_ErrorShape, value, f"{prefix}{field.name}.")
            else:
                errors.append(_located(f"{prefix}{field.name}", e, field.type))
    if kind.__struct_config__.forbid_unknown_fields:
        known = {field.encode_name for field in fields}
        errors += [(f"{prefix}{key}", "unknown field: not allowed") for key in obj if key not in known]
    return errors


def _convert(obj: dict[str, Any], kind: type[Struct], prefix: str) -> Any:
    try:
        return msgspec.convert(obj, kind, strict=True, dec_hook=_decode_hook)
    except msgspec.ValidationError as e:
        raise InvalidEvent(_field_errors(kind, obj, prefix) or [_located(prefix.rstrip("."), e, kind)]) from None


def validate_stream_id(stream_id: object) -> str:
    """Return ``stream_id`` if it is a valid stream id (SPEC.md section 1), else raise InvalidEvent."""
    if not isinstance(stream_id, str) or not STREAM_ID_PATTERN.fullmatch(stream_id):
        raise InvalidEvent([("subject", f"stream id {stream_id!r} must be {_STREAM_ID_RULE}")])
    return stream_id


def proven_stream(raw: object) -> str | None:
    """The stream that a decoded object, valid event or not, proves it belongs to: its ``subject``, if that is a stream
    id and the object's ``hash`` is the one SPEC.md section 3 gives it (so its subject, seq and prevhash are what its
    producer hashed and chained on); else None: whatever stream it names, it proves nothing."""
    if not isinstance(raw, dict):
        return None
    subject, claimed = raw.get("subject"), raw.get("hash")
    if not (isinstance(subject, str) and STREAM_ID_PATTERN.fullmatch(subject) and isinstance(claimed, str)):
        return None
    try:
        return subject if compute_hash(raw) == claimed else None
    except (TypeError, ValueError, RecursionError):  # what JCS cannot canonicalise has no hash
        return None


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
    return _convert(data, EVENT_TYPES[event_type], "data.")  # type: ignore[no-any-return]  # one of EventData


def decode_json(value: bytes | str) -> dict[str, Any]:
    """Decode one JSON object; raise InvalidJson (never a bare decoder error), or DuplicateMember
    (``invalid_event``) if an object in it, at any depth, has two members of one name (I-JSON, SPEC.md section 3).
    """
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise InvalidJson(f"not valid UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidJson(f"expected a JSON object, got a JSON {type(obj).__name__}")
    problems = duplicate_members(value, encoded_colons(obj))
    if problems:
        raise DuplicateMember(problems, obj)
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
    Raises TooLarge, InvalidJson, UnknownType, InvalidEvent (DuplicateMember among them) or HashMismatch;
    all are ``PermanentError``.
    """
    raw = value if isinstance(value, dict) else decode_event(value)
    try:
        plain = is_plain(raw)  # one walk serves the number and U+0000 checks and the hash
    except RecursionError:
        raise InvalidEvent([("data", "nested too deeply")]) from None
    data = validate_data(raw.get("type"), raw.get("data"), plain=plain or None)
    if not plain:
        problems = list(unsafe_values({k: v for k, v in raw.items() if k != "data"}))
        if problems:
            raise InvalidEvent(problems)
    event: Event = _convert(raw, Event, "")
    msgspec.structs.force_setattr(event, "data", data)
    if verify_hash:
        try:
            expected = compute_hash(raw, plain=plain)
        except (TypeError, ValueError, RecursionError) as e:  # the encoders' depth limits
            raise InvalidEvent([("data", f"cannot be canonicalised: {e}")]) from None
        if expected != event.hash:
            raise HashMismatch(expected, event.hash)
    return event
