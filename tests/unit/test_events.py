"""Event models and the parser: typed events, or typed errors that name the field."""

from __future__ import annotations

import random
import typing
from decimal import Decimal
from typing import Any

import msgspec
import orjson
import pytest

from runledger.schemas.chain import compute_hash
from runledger.schemas.errors import HashMismatch, InvalidEvent, InvalidJson, PermanentError, TooLarge, UnknownType
from runledger.schemas.events import (
    EVENT_TYPES,
    MAX_EVENT_BYTES,
    MAX_ID_CHARS,
    CostIncurred,
    Event,
    StepFailed,
    StepSkipped,
    _decode_hook,
    _field_errors,
    decode_event,
    format_time,
    parse_event,
)
from tests.conftest import VECTOR_EVENTS


def event(type_: str = "cost.incurred", data: dict[str, Any] | None = None, **attrs: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "specversion": "1.0", "id": "0b9e4a52-8e55-4d7e-9f7a-1f0c2b3d4e5f", "source": "/producers/test",
        "type": type_, "subject": "exec-1", "time": "2026-11-22T10:00:00.125Z",
        "datacontenttype": "application/json", "seq": 2, "prevhash": "a" * 64,
        "data": data if data is not None else {"provider": "openai", "model": "gpt-4o", "input_tokens": 10,
                                               "output_tokens": 5, "cost_usd": "0.000125"},
    }
    raw.update(attrs)
    try:
        raw["hash"] = compute_hash(raw)
    except ValueError:  # a number JCS cannot represent: refused before the hash is looked at
        raw["hash"] = "0" * 64
    return raw


def test_every_vector_parses_to_its_typed_event() -> None:
    types = set()
    for raw in VECTOR_EVENTS:
        parsed = parse_event(orjson.dumps(raw))
        assert isinstance(parsed.data, EVENT_TYPES[raw["type"]])
        assert parsed.time.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        types.add(raw["type"])
    assert len(types) == 12


def test_money_is_decimal() -> None:
    parsed = parse_event(event())
    assert isinstance(parsed.data, CostIncurred)
    assert parsed.data.cost_usd == Decimal("0.000125") and isinstance(parsed.data.cost_usd, Decimal)


def test_unknown_data_fields_are_accepted_and_covered_by_the_hash() -> None:
    raw = event("step.skipped", {"step_id": "s1", "vendor_note": {"x": 1}})
    assert parse_event(raw).data == StepSkipped(step_id="s1")  # ignored by the projections, kept in the bytes
    assert type(_error({**raw, "data": {**raw["data"], "vendor_note": {"x": 2}}})) is HashMismatch


def test_an_error_object_keeps_its_other_members() -> None:
    error = {"type": "Timeout", "message": "took too long", "stack": ["a", "b"]}
    parsed = parse_event(event("step.failed", {"step_id": "s1", "error": error}))
    assert isinstance(parsed.data, StepFailed) and parsed.data.error == error


def _error(raw: Any) -> PermanentError:
    with pytest.raises(PermanentError) as caught:
        parse_event(raw)
    return caught.value


@pytest.mark.parametrize(
    ("raw", "error_type", "field", "reason"),
    [
        (event(data={"provider": "p", "model": "m", "input_tokens": 1, "output_tokens": 1, "cost_usd": 0.5}),
         InvalidEvent, "data.cost_usd", "decimal string"),
        (event(data={"provider": "p", "model": "m", "input_tokens": 1, "output_tokens": 1, "cost_usd": "1e-3"}),
         InvalidEvent, "data.cost_usd", "decimal"),
        (event(data={"provider": "p", "model": "m", "input_tokens": 1, "output_tokens": 1,
                     "cost_usd": "0.0000000000001"}), InvalidEvent, "data.cost_usd", "12 digits"),
        (event(data={"provider": "p", "input_tokens": 1, "output_tokens": 1}), InvalidEvent, "data.model",
         "required"),
        (event(data={"provider": "p", "model": "m", "input_tokens": True, "output_tokens": 1}), InvalidEvent,
         "data.input_tokens", "Expected `int`, got `bool`"),
        (event(data={"provider": "p", "model": "m", "input_tokens": -1, "output_tokens": 1}), InvalidEvent,
         "data.input_tokens", "Expected `int` >= 0"),
        (event("execution.started", {"workflow": "w", "input": {"big": 2**53}}), InvalidEvent,
         "data.input.big", "2^53"),
        (event("step.failed", {"step_id": "s", "error": {"message": "m"}}), InvalidEvent, "data.error.type",
         "required"),
        (event("artifact.created", {"artifact_id": "a", "type": "movie", "name": "n", "uri": "u"}),
         InvalidEvent, "data.type", "report"),
        (event("agent.exploded", {}), UnknownType, "type", "unknown event type"),
        (event(subject="bad stream!"), InvalidEvent, "subject", "A-Z a-z 0-9"),
        (event(subject="x" * 201), InvalidEvent, "subject", "200"),
        (event(time="2026-11-22T11:00:00+01:00"), InvalidEvent, "time", "UTC"),
        (event(time="2026-11-22"), InvalidEvent, "time", "RFC 3339"),
        (event(seq=0), InvalidEvent, "seq", "Expected `int` >= 1"),
        (event(seq="2"), InvalidEvent, "seq", "Expected `int`, got `str`"),
        (event(id="0B9E4A52-8E55-4D7E-9F7A-1F0C2B3D4E5F"), InvalidEvent, "id", "UUID in lowercase hex"),
        (event(specversion="0.3"), InvalidEvent, "specversion", "1.0"),
        (event(datacontenttype="text/plain"), InvalidEvent, "datacontenttype", "application/json"),
        (event(color="red"), InvalidEvent, "color", "unknown field: not allowed"),
        (event("execution.started", {"workflow": "w", "input": {"note": "a\x00b"}}), InvalidEvent,
         "data.input.note", "U+0000"),
        (event("execution.started", {"workflow": "w", "input": {"deeper": {"a\x00b": 1}}}), InvalidEvent,
         "data.input.deeper", "key 'a\\x00b' contains U+0000"),
        (event(source="/producers/a\x00b"), InvalidEvent, "source", "U+0000"),
        (event("step.completed", {"step_id": "s1", "output": {"lines": ["ok", "\x00"]}}), InvalidEvent,
         "data.output.lines[1]", "U+0000"),
        (event("step.started", {"step_id": "s\x00", "name": "n"}), InvalidEvent, "data.step_id", "U+0000"),
        ({**event(), "hash": "b" * 64}, HashMismatch, None, "hashes to"),
        (b"{not json", InvalidJson, None, "JSON"),
        (b"[1, 2]", InvalidJson, None, "object"),
        (b"\xff\xfe", InvalidJson, None, "UTF-8"),
    ],
)
def test_bad_input_names_the_field_and_the_reason(raw: Any, error_type: type, field: str | None,
                                                 reason: str) -> None:
    error = _error(raw)
    assert type(error) is error_type
    assert not error.transient
    if field is not None:
        assert isinstance(error, InvalidEvent)
        assert error.field == field
    assert reason in str(error)


def test_every_error_of_an_event_is_reported() -> None:
    error = _error(event(data={"provider": "p", "model": 3, "input_tokens": 1.5, "output_tokens": 1}))
    assert isinstance(error, InvalidEvent)
    assert {f for f, _ in error.errors} == {"data.model", "data.input_tokens"}


def test_optional_attributes_are_covered_by_the_hash() -> None:
    raw = event(traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", dataschema="urn:x")
    assert parse_event(raw).traceparent is not None
    assert type(_error({**raw, "dataschema": "urn:y"})) is HashMismatch


def test_format_time_is_utc_with_milliseconds() -> None:
    from datetime import datetime, timedelta, timezone

    moment = datetime(2026, 11, 22, 11, 0, 0, 125000, tzinfo=timezone(timedelta(hours=1)))
    assert format_time(moment) == "2026-11-22T10:00:00.125Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        format_time(datetime(2026, 11, 22))  # noqa: DTZ001 - the point of the test


def test_deeply_nested_data_is_an_invalid_event_not_a_crash() -> None:
    deep: object = 1
    for _ in range(900):
        deep = [deep]
    with pytest.raises(InvalidEvent, match="nested too deeply"):
        parse_event({**VECTOR_EVENTS[0], "data": {"workflow": "w", "input": {"x": deep}}})


def test_u0000_is_refused_from_bytes_too_and_never_lands_in_the_message() -> None:
    raw = event("execution.started", {"workflow": "w", "input": {"k\x00": "v\x00", "ok": "\x00"}})
    error = _error(orjson.dumps(raw))  # on the wire as \u0000: decoded, then refused
    assert isinstance(error, InvalidEvent)
    nul = "contains U+0000, which PostgreSQL text and jsonb cannot store (SPEC.md section 4)"
    assert error.errors == [("data.input", f"key 'k\\x00' {nul}"), ("data.input.k\\x00", nul), ("data.input.ok", nul)]
    assert "\x00" not in str(error)


def test_a_key_with_u0000_at_the_top_of_data_is_named_data() -> None:
    error = _error(event("step.skipped", {"step_id": "s1", "\x00": 1}))
    assert isinstance(error, InvalidEvent) and error.field == "data" and "key '\\x00'" in error.reason


def _padded(size: int, filler: str = "x") -> bytes:
    """A valid event of exactly ``size`` encoded bytes, padded with ``filler`` (one character)."""
    def encoded(note: str) -> bytes:
        return orjson.dumps(event("execution.started", {"workflow": "w", "input": {"note": note}}))
    room, width = size - len(encoded("")), len(filler.encode())
    value = encoded(filler * (room // width) + "x" * (room % width))
    assert len(value) == size
    return value


def test_an_event_of_512_kib_parses_and_one_byte_more_is_too_large() -> None:
    assert parse_event(_padded(MAX_EVENT_BYTES)).data.input is not None  # type: ignore[union-attr]
    error = _error(_padded(MAX_EVENT_BYTES + 1))
    assert type(error) is TooLarge and isinstance(error, InvalidEvent)
    assert error.code == "too_large" and not error.transient
    assert "524,289 bytes" in str(error) and "artifact.created" in str(error)


def test_text_is_measured_in_utf8_bytes_not_characters() -> None:
    # 2-byte characters: the limit counts the encoded bytes, as a Kafka record value would.
    at_limit = _padded(MAX_EVENT_BYTES, "é").decode()
    assert len(at_limit) < MAX_EVENT_BYTES
    parse_event(at_limit)
    over = _padded(MAX_EVENT_BYTES + 1, "é").decode()
    assert len(over) < MAX_EVENT_BYTES
    with pytest.raises(TooLarge, match="524,289 bytes"):
        parse_event(over)


def test_too_large_is_refused_before_decoding() -> None:
    with pytest.raises(TooLarge):
        decode_event(b"x" * (MAX_EVENT_BYTES + 1))  # not JSON either: the size is checked first
    with pytest.raises(InvalidJson):
        decode_event(b"x" * MAX_EVENT_BYTES)


def test_a_decoded_object_is_not_measured() -> None:
    raw = orjson.loads(_padded(MAX_EVENT_BYTES + 1))
    assert parse_event(raw).seq == 2  # the caller holds no bytes; a producer measures its own encoding


def test_the_field_by_field_check_agrees_with_the_one_pass_check() -> None:
    """The errors come from a second, field-by-field check: it must refuse exactly what the fast one refuses."""
    rng = random.Random(7)
    values = [None, True, 0, -1, 2**53, 1.5, "", "x\n", "1e-3", "0.1", "2026-11-22T10:00:00+01:00",
              "2026-11-22 10:00:00Z", [], {}, {"type": "t"}, {"type": "t", "message": "m", "k": 1}, "movie", "report",
              "a" * 64, "a" * 64 + "\n", "0b9e4a52-8e55-4d7e-9f7a-1f0c2b3d4e5f"]
    refused = 0
    for _ in range(3000):
        raw = dict(rng.choice(VECTOR_EVENTS))
        data = dict(raw["data"])
        keys = [*data, "step_id", "name", "error", "cost_usd", "input_tokens", "type", "after_seconds"]
        data[rng.choice(keys)] = rng.choice(values)
        raw[rng.choice([*raw, "color"])] = rng.choice(values)
        raw["data"] = data
        for kind, obj, prefix in ((EVENT_TYPES.get(str(raw.get("type")), Event), data, "data."), (Event, raw, "")):
            try:
                msgspec.convert(obj, kind, strict=True, dec_hook=_decode_hook)
                passed = True
            except msgspec.ValidationError:
                passed = False
            errors = _field_errors(kind, obj, prefix)
            assert passed == (not errors), (obj, errors)
            refused += not passed
    assert refused > 1000  # the mutations do reach the checks


@pytest.mark.parametrize("written", ["2016-12-31T23:59:60Z", "2016-12-31T23:59:60.250Z",
                                     "2017-01-01T01:59:60+02:00"])
def test_a_leap_second_is_the_minutes_last_microsecond(written: str) -> None:
    parsed = parse_event(event(time=written))  # RFC 3339 section 5.7; SPEC.md section 2
    assert parsed.time.isoformat() == "2016-12-31T23:59:59.999999+00:00"


@pytest.mark.parametrize("written", ["2016-12-31T12:00:60Z", "2016-12-31T23:59:61Z", "2016-12-31T23:59:60"])
def test_a_second_60_that_is_no_leap_second_is_refused(written: str) -> None:
    with pytest.raises(InvalidEvent, match="time"):
        parse_event(event(time=written))


# Every identifier inside data (SPEC.md section 4), by each event type of section 5 that carries it, with the
# rest of a valid data object.
IDENTIFIERS = [
    ("execution.started", "workflow", {}),
    ("execution.started", "agent_id", {"workflow": "w"}),
    ("execution.started", "customer_id", {"workflow": "w"}),
    ("step.started", "step_id", {"name": "n"}),
    ("step.retrying", "step_id", {"attempt": 1}),
    ("step.completed", "step_id", {}),
    ("step.failed", "step_id", {"error": {"type": "t", "message": "m"}}),
    ("step.skipped", "step_id", {}),
    ("cost.incurred", "provider", {"model": "m", "input_tokens": 1, "output_tokens": 1}),
    ("cost.incurred", "model", {"provider": "p", "input_tokens": 1, "output_tokens": 1}),
    ("cost.incurred", "step_id", {"provider": "p", "model": "m", "input_tokens": 1, "output_tokens": 1}),
    ("artifact.created", "artifact_id", {"type": "report", "name": "n", "uri": "u"}),
    ("artifact.created", "step_id", {"artifact_id": "a", "type": "report", "name": "n", "uri": "u"}),
]


@pytest.mark.parametrize(("type_", "field", "rest"), IDENTIFIERS, ids=[f"{t}.{f}" for t, f, _ in IDENTIFIERS])
def test_an_identifier_is_1_to_200_characters_and_a_longer_one_is_an_invalid_event_naming_it(
        type_: str, field: str, rest: dict[str, Any]) -> None:
    assert parse_event(event(type_, {**rest, field: "é" * MAX_ID_CHARS}))  # characters, not bytes
    for refused in ("x" * (MAX_ID_CHARS + 1), "", "a" * 100_000):
        error = _error(event(type_, {**rest, field: refused}))
        assert isinstance(error, InvalidEvent) and error.code == "invalid_event"
        assert error.errors == [(f"data.{field}", "must be 1 to 200 characters (SPEC.md section 4)")]


def test_the_bounded_fields_are_exactly_the_identifiers_of_the_spec() -> None:
    def limit(kind: Any) -> int | None:
        metas = [m for t in (kind, *typing.get_args(kind)) for m in getattr(t, "__metadata__", ())]
        return next((m.max_length for m in metas if isinstance(m, msgspec.Meta) and m.max_length), None)

    bounded = {(t, f.name): limit(f.type) for t, kind in EVENT_TYPES.items() for f in msgspec.structs.fields(kind)
               if limit(f.type) is not None}
    assert bounded == {(t, f): MAX_ID_CHARS for t, f, _ in IDENTIFIERS}
