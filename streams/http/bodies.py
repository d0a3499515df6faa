"""What an append request holds, read without any I/O: the simple body of ``POST /v1/streams/{stream}/events`` and the
CloudEvents HTTP binding of ``POST /v1/events`` (structured, batched and binary mode), turned into events to append,
every failed field named with the index of its event (docs/http.md, "Appending" and "CloudEvents")."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

from runledger.schemas.errors import HashMismatch, InvalidEvent, RunledgerError, TooLarge
from runledger.schemas.events import MAX_EVENT_BYTES, STREAM_ID_PATTERN, parse_event
from runledger.schemas.ijson import duplicate_members, encoded_colons
from runledger.schemas.times import parse_utc_time
from runledger.streams.http.problems import Problem
from runledger.streams.producer.events import NewEvent, check_new_events

__all__ = ["CE_BATCH", "CE_STRUCTURED", "MAX_BATCH", "CloudEvents", "binary_event", "cloudevents", "event_key",
           "media_type", "request_key", "simple_events"]

MAX_BATCH = 1000
"""Events one request may append."""

CE_STRUCTURED = "application/cloudevents+json"
CE_BATCH = "application/cloudevents-batch+json"

_SIMPLE_FIELDS = ("type", "data", "time", "idempotency_key")
_CE_SERVER_CHAINED = {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data"}
_CHAIN_FIELDS = ("seq", "prevhash", "hash")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_INDEXED = re.compile(r"^\[(\d+)\]\.?(.*)$")
_TOO_LARGE = (f"at most {MAX_EVENT_BYTES:,} bytes (512 KiB) an event: put larger content outside the log, named by "
              "an artifact.created uri")


def _error(field: str, reason: str, index: int | None) -> dict[str, Any]:
    return {"field": field, "reason": reason} if index is None else {"field": field, "reason": reason, "index": index}


def _invalid(errors: list[dict[str, Any]], what: str = "the request's events are invalid") -> Problem:
    """422 ``invalid_event``, or 413 ``too_large`` if an event is over the limit (its errors alone)."""
    large = [e for e in errors if e.get("code") == "too_large"]
    if large:
        return Problem(413, "too_large", f"an event is over {MAX_EVENT_BYTES:,} bytes (512 KiB); nothing was "
                       "appended", errors=[{k: v for k, v in e.items() if k != "code"} for e in large])
    return Problem(422, "invalid_event", f"{what}; nothing was appended", errors=[
        {k: v for k, v in e.items() if k != "code"} for e in errors])


def _field_errors(e: RunledgerError, index: int | None) -> list[dict[str, Any]]:
    if isinstance(e, InvalidEvent):
        return [{**_error(f, r, index), "code": e.code} for f, r in e.errors]
    if isinstance(e, HashMismatch):
        return [_error("hash", str(e), index)]
    return [_error("", f"{e.code}: {e}", index)]


def request_key(source_id: str, kind: str, *parts: str | int) -> str:
    """An idempotency key of ``source_id``'s own: no source can name, or collide with, another's keys."""
    return "http:" + hashlib.sha256(orjson.dumps([source_id, kind, *parts])).hexdigest()


def event_key(source_id: str, own: str | None, webhook_id: str | None, index: int) -> str | None:
    """The idempotency key of a request's event ``index``: its ``own`` key, namespaced by the source, else one
    derived from the request's ``webhook-id`` (so a retried request appends nothing twice), else none."""
    if own is not None:
        return request_key(source_id, "key", own)
    if webhook_id is not None:
        return request_key(source_id, "webhook", webhook_id, index)
    return None


def media_type(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def _decode(body: bytes) -> Any:
    """The body as JSON: 400 ``invalid_json`` naming the position, or 422 naming a member its object has twice."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise Problem(400, "invalid_json", f"the body is not valid UTF-8 JSON: {e.msg} at line {e.lineno} column "
                      f"{e.colno} (byte {e.pos})", errors=[{"field": "", "reason": f"{e.msg} at line {e.lineno} "
                                                            f"column {e.colno} (byte {e.pos})"}]) from None
    if isinstance(value, dict | list):
        repeated = duplicate_members(body, encoded_colons(value))
        if repeated:
            errors = []
            for path, reason in repeated:
                found = _INDEXED.match(path)
                errors.append(_error(found[2], reason, int(found[1])) if found and isinstance(value, list)
                              else _error(path, reason, None))
            raise _invalid(errors, "an object of the body has two members of one name (RFC 7493)")
    return value


def _batch(value: Any, *, single: bool) -> tuple[list[Any], bool]:
    """One object (if ``single``), or an array of 1 to MAX_BATCH: (the items, whether it was an array)."""
    if single and isinstance(value, dict):
        return [value], False
    if not isinstance(value, list):
        raise Problem(400, "invalid_body", f"the body must be a JSON object or an array of them, not a JSON "
                      f"{type(value).__name__}")
    if not value:
        raise Problem(422, "invalid_event", "the array holds no event", errors=[_error("", "holds no event", None)])
    if len(value) > MAX_BATCH:
        raise Problem(413, "batch_too_large", f"the array holds {len(value):,} events; a request appends at most "
                      f"{MAX_BATCH:,}", errors=[_error("", f"at most {MAX_BATCH:,} events", None)])
    bad = [_error("", f"must be a JSON object, not {type(v).__name__}", i) for i, v in enumerate(value)
           if not isinstance(v, dict)]
    if bad:
        raise _invalid(bad)
    return value, True


def _repeated_keys(keys: Sequence[Any], field: str, indexed: bool) -> list[dict[str, Any]]:
    """The keys given twice; one that is no string (refused by its own check) is skipped, not hashed."""
    first: dict[str, int] = {}
    errors = []
    for i, key in enumerate(keys):
        if not isinstance(key, str):
            continue
        if key in first:
            errors.append(_error(field, f"repeated within one request (as at index {first[key]})", i if indexed
                                 else None))
        first.setdefault(key, i)
    return errors


def _check_each(stream: str, events: Sequence[tuple[int, NewEvent]], indexed: bool) -> list[dict[str, Any]]:
    """Each event (with its index) checked as ``runledger produce`` checks it: every failed field."""
    errors = []
    for i, event in events:
        try:
            check_new_events(stream, [event])
        except TooLarge as e:
            errors += [{**_error(f, r, i if indexed else None), "code": "too_large"} for f, r in e.errors]
        except InvalidEvent as e:
            errors += _field_errors(e, i if indexed else None)
    return errors


def simple_events(stream: str, body: bytes, *, source_id: str, webhook_id: str | None) -> list[NewEvent]:
    """The events of a ``POST /v1/streams/{stream}/events`` body (one ``{"type", "data", "time"?,
    "idempotency_key"?}`` object or an array of 1 to 1,000), each with its namespaced idempotency key; every event
    checked as ``runledger produce`` checks it. Raises a ``Problem`` (400, 413 or 422) naming every failed field."""
    items, indexed = _batch(_decode(body), single=True)
    errors: list[dict[str, Any]] = []
    events: list[tuple[int, NewEvent]] = []
    for i, item in enumerate(items):
        at = i if indexed else None
        bad = [_error(name, f"unknown field; an event has {', '.join(_SIMPLE_FIELDS)}", at)
               for name in sorted(set(item) - set(_SIMPLE_FIELDS))]
        bad += [_error(name, "missing", at) for name in ("type", "data") if name not in item]
        own = item.get("idempotency_key")
        if own is not None and not (isinstance(own, str) and 1 <= len(own) <= 200):
            bad.append(_error("idempotency_key", "must be a string of 1 to 200 characters", at))
        when = None
        if item.get("time") is not None:
            try:
                when = parse_utc_time(item["time"])
            except ValueError as e:
                bad.append(_error("time", str(e), at))
        if bad:
            errors += bad
            continue
        events.append((i, NewEvent(item["type"], item["data"], event_key(source_id, own, webhook_id, i), when)))
    errors += _repeated_keys([item.get("idempotency_key") for item in items], "idempotency_key", indexed)
    errors += _check_each(stream, events, indexed)
    if errors:
        raise _invalid(sorted(errors, key=lambda e: e.get("index", 0)))
    return [event for _, event in events]


# CloudEvents ----------------------------------------------------------------------------------------------------


def binary_event(headers: Mapping[str, str], data: Any, content_type: str | None) -> dict[str, Any]:
    """The event of a binary-mode request (CloudEvents HTTP binding, section 3.1): each ``ce-<name>`` header is the
    attribute ``<name>`` (its value percent-decoded), ``Content-Type`` is ``datacontenttype``, the body is ``data``.
    ``ce-seq`` is a decimal integer (an extension attribute of type Integer)."""
    event: dict[str, Any] = {}
    for name, value in headers.items():
        lower = name.lower()
        if not lower.startswith("ce-") or len(lower) == 3:
            continue
        attribute, text = lower[3:], unquote(value)
        event[attribute] = int(text) if attribute == "seq" and re.fullmatch(r"-?[0-9]{1,16}", text) else text
    if content_type is not None:
        event["datacontenttype"] = media_type(content_type)
    event["data"] = data
    return event


@dataclass(frozen=True, slots=True)
class CloudEvents:
    """A ``POST /v1/events`` request's events, all of one stream: chained by their producer (``chained``: published
    as they are, ``raw``) or by the server (``events``); ``keys`` are their idempotency keys, from their ids."""

    mode: str  # structured, batched or binary
    stream: str
    chained: bool
    raw: list[dict[str, Any]]
    events: list[NewEvent]
    keys: list[str | None]
    sources: list[str]  # the sources the events name (the caller's, or refused)


def _ce_items(content_type: str | None, headers: Mapping[str, str], body: bytes) -> tuple[str, list[Any], bool]:
    kind = media_type(content_type)
    if kind == CE_STRUCTURED:
        value = _decode(body)
        if not isinstance(value, dict):
            raise Problem(400, "invalid_body", f"a structured-mode body is one JSON object, not a JSON "
                          f"{type(value).__name__}")
        return "structured", [value], False
    if kind == CE_BATCH:
        value = _decode(body)
        if isinstance(value, dict):
            raise Problem(400, "invalid_body", "a batched-mode body is a JSON array of events")
        items, _ = _batch(value, single=False)
        return "batched", items, True
    if any(name.lower() == "ce-specversion" for name in headers):
        if kind != "application/json":
            raise Problem(415, "unsupported_media_type", f"a binary-mode event's data must be application/json, "
                          f"not {kind or 'without a Content-Type'}", headers={"Accept-Post": "application/json, "
                                                                             f"{CE_STRUCTURED}, {CE_BATCH}"})
        return "binary", [binary_event(headers, _decode(body), content_type)], False
    raise Problem(415, "unsupported_media_type", f"POST /v1/events takes {CE_STRUCTURED} (structured mode), {CE_BATCH} "
                  f"(batched mode) or ce-* headers with an application/json body (binary mode), not "
                  f"{kind or 'a body without a Content-Type'}",
                  headers={"Accept-Post": f"{CE_STRUCTURED}, {CE_BATCH}, application/json"})


def cloudevents(content_type: str | None, headers: Mapping[str, str], body: bytes, *,
                source_id: str, webhook_id: str | None) -> CloudEvents:
    """The events of a ``POST /v1/events`` request (CloudEvents HTTP binding), checked: one stream (their
    ``subject``), all chained by their producer (``seq``, ``prevhash``, ``hash``: each validated in full, its hash
    verified) or none. Raises a ``Problem`` (400, 413, 415 or 422) naming every failed field."""
    mode, items, indexed = _ce_items(content_type, headers, body)
    errors: list[dict[str, Any]] = []

    def at(i: int) -> int | None:
        return i if indexed else None

    for i, item in enumerate(items):
        size = len(orjson.dumps(item))
        if size > MAX_EVENT_BYTES:
            errors.append({**_error("", f"encodes to {size:,} bytes; {_TOO_LARGE}", at(i)), "code": "too_large"})
        if item.get("specversion") != "1.0":
            errors.append(_error("specversion", f"must be \"1.0\", not {item.get('specversion')!r}", at(i)))
        subject = item.get("subject")
        if not (isinstance(subject, str) and STREAM_ID_PATTERN.fullmatch(subject)):
            errors.append(_error("subject", "the stream id, 1 to 200 characters from A-Z a-z 0-9 . _ : -, is "
                                 "required", at(i)))
    if errors:
        raise _invalid(errors)
    streams = sorted({item["subject"] for item in items})
    if len(streams) > 1:
        raise _invalid([_error("subject", f"one stream a request (all or nothing); this one names {len(streams)}",
                               None)], "the request's events name more than one stream")
    chained = [any(f in item for f in _CHAIN_FIELDS) for item in items]
    if any(chained) and not all(chained):
        raise _invalid([_error("seq", "either every event of a request carries seq, prevhash and hash (chained "
                               "by its producer) or none does", at(i)) for i, c in enumerate(chained) if not c])
    ids = [item.get("id") for item in items]
    # An event's id is its idempotency key (CloudEvents: source + id identify an event); without one, the request's.
    keys: list[str | None] = [request_key(source_id, "ce", i) if isinstance(i, str) else
                              event_key(source_id, None, webhook_id, n) for n, i in enumerate(ids)]
    errors = _repeated_keys(ids, "id", indexed)
    sources = sorted({item["source"] for item in items if isinstance(item.get("source"), str)})
    if all(chained):
        errors += _checked(items, lambda item: parse_event(item), at)
        if errors:
            raise _invalid(errors)
        return CloudEvents(mode, streams[0], True, items, [], keys, sources)
    events: list[tuple[int, NewEvent]] = []
    for i, item in enumerate(items):
        bad = [_error(name, f"unknown attribute; an event the server chains has "
                      f"{', '.join(sorted(_CE_SERVER_CHAINED))}", at(i))
               for name in sorted(set(item) - _CE_SERVER_CHAINED)]
        if item.get("datacontenttype", "application/json") != "application/json":
            bad.append(_error("datacontenttype", "must be application/json", at(i)))
        if "id" in item and not (isinstance(item["id"], str) and _UUID.fullmatch(item["id"])):
            bad.append(_error("id", "must be a UUID in lowercase hex form (SPEC.md section 2)", at(i)))
        if "source" in item and not isinstance(item["source"], str):
            bad.append(_error("source", "must be a string", at(i)))
        bad += [_error(name, "missing", at(i)) for name in ("type", "data") if name not in item]
        when = None
        if item.get("time") is not None:
            try:
                when = parse_utc_time(item["time"])
            except ValueError as e:
                bad.append(_error("time", str(e), at(i)))
        if bad:
            errors += bad
            continue
        events.append((i, NewEvent(item["type"], item["data"], keys[i], when, item.get("id"))))
    errors += _check_each(streams[0], events, indexed)
    if errors:
        raise _invalid(sorted(errors, key=lambda e: e.get("index", 0)))
    return CloudEvents(mode, streams[0], False, items, [event for _, event in events], keys, sources)


def _checked(items: Sequence[dict[str, Any]], check: Callable[[dict[str, Any]], object],
             at: Callable[[int], int | None]) -> list[dict[str, Any]]:
    errors = []
    for i, item in enumerate(items):
        try:
            check(item)
        except TooLarge as e:
            errors += [{**_error(f, r, at(i)), "code": "too_large"} for f, r in e.errors]
        except RunledgerError as e:
            errors += _field_errors(e, at(i))
    return errors
