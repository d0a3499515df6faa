"""The hash chain of SPEC.md section 3: JCS (RFC 8785) + SHA-256, and chain checks.

Pure functions over plain JSON objects (``dict``), so that what is hashed is
exactly what was received, never a re-serialisation of a model.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson
import rfc8785

from runledger.schemas.errors import DuplicateMember
from runledger.schemas.ijson import duplicate_members

__all__ = [
    "GENESIS_HASH",
    "MAX_SAFE_INTEGER",
    "ChainBreak",
    "Head",
    "canonical",
    "compute_hash",
    "stored_event",
    "stored_hash",
    "link_error",
    "unsafe_values",
    "verify_chain",
]

GENESIS_HASH = "0" * 64
"""The ``prevhash`` of every stream's first event."""

MAX_SAFE_INTEGER = 2**53 - 1


_NUL_REASON = "contains U+0000, which PostgreSQL text and jsonb cannot store (SPEC.md section 4)"


def unsafe_values(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Yield (field path, reason) for every value SPEC.md section 4 forbids: a number JCS cannot
    canonicalise, or a string, value or key, that contains U+0000.

    A key is shown by ``repr`` so that no raw NUL lands in a message or a path.
    """
    if isinstance(value, str):
        if "\x00" in value:
            yield path, _NUL_REASON
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            yield path, f"integer {value} is outside ±(2^53 − 1)"
    elif isinstance(value, float):
        if not math.isfinite(value):
            yield path, f"{value} is not a finite number"
    elif isinstance(value, Mapping):
        for key, item in value.items():
            name = str(key)
            if "\x00" in name:
                yield path, f"key {name!r} {_NUL_REASON}"
                name = repr(name)[1:-1]  # the rest of the object is still checked, under a printable name
            yield from unsafe_values(item, f"{path}.{name}" if path else name)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from unsafe_values(item, f"{path}[{index}]")


def is_plain(value: Any) -> bool:
    """Whether ``value`` holds no float, no integer beyond ±(2^53 − 1), no key outside the Basic
    Multilingual Plane and no U+0000 in any string or key: the common case, where every value is
    allowed and orjson's sorted output is exactly JCS. (orjson escapes strings as JCS does and writes
    integers alike; it differs only on floats, ES6 number form, and on such keys, which JCS sorts by
    UTF-16 code units.) If it is False, ``unsafe_values`` says what is forbidden, if anything.
    One walk, no allocation: it runs on every event a worker reads."""
    kind = type(value)
    if kind is str:
        return "\x00" not in value
    if kind is bool or value is None:
        return True
    if kind is int:
        return -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER  # type: ignore[no-any-return]  # an int: a bool
    if kind is dict:
        for key, item in value.items():
            if not key.isascii() and max(map(ord, key)) > 0xFFFF:
                return False
            if "\x00" in key:
                return False
            if type(item) is str:  # most values: checked here, which saves a call (the NUL check's cost)
                if "\x00" in item:
                    return False
            elif not is_plain(item):
                return False
        return True
    if kind is list:
        return all(is_plain(item) for item in value)
    return False


def canonical(event: Mapping[str, Any], *, plain: bool | None = None) -> bytes:
    """The JCS (RFC 8785) UTF-8 bytes of ``event`` without its ``hash`` attribute.

    ``plain``: ``is_plain(event)`` if the caller already knows it.
    """
    body = {k: v for k, v in event.items() if k != "hash"}
    if plain if plain is not None else is_plain(body):
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)  # same bytes, ~10x faster
    return rfc8785.dumps(body)


def compute_hash(event: Mapping[str, Any], *, plain: bool | None = None) -> str:
    """``lowercase_hex(SHA-256(JCS(event without "hash")))``; ``plain`` as for ``canonical``."""
    return hashlib.sha256(canonical(event, plain=plain)).hexdigest()


_floats: list[str] = []  # the floats the decoder saw in the last event it decoded


def _float(text: str) -> float:
    _floats.append(text)
    return float(text)


_DECODER = msgspec.json.Decoder(float_hook=_float)
_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB]")  # an escaped one: the first half of a pair outside the BMP


def _bmp_only(raw: bytes) -> bool:
    """Whether the JSON bytes hold no character outside the BMP, written out or escaped (byte scans in C)."""
    # F0-F4 lead a 4-byte UTF-8 sequence; an int is looked for with memchr, so 92 is "\\".
    if not raw.isascii() and (0xF0 in raw or 0xF1 in raw or 0xF2 in raw or 0xF3 in raw or 0xF4 in raw):
        return False
    return 92 not in raw or _HIGH_SURROGATE.search(raw) is None


def stored_hash(raw: bytes) -> tuple[dict[str, Any], Any, str]:
    """Decode an event's bytes and hash them: (the event without its ``hash``, the ``hash`` it carries, the hash
    its content has). For checking stored events fast: the walk ``is_plain`` makes is needed only if the bytes
    hold a float or a character outside the BMP, which the decoder and one scan of the bytes see. It does not
    check that the bytes are I-JSON: ``stored_event`` does.

    Raises ``msgspec.DecodeError`` (not JSON), or what ``canonical`` raises (no JCS form). Not thread-safe.
    """
    return _stored(raw, i_json=False)


def stored_event(raw: bytes) -> tuple[dict[str, Any], Any, str]:
    """``stored_hash``, and DuplicateMember (``invalid_event``) if an object of the bytes, at any depth, has two
    members of one name (SPEC.md section 3): such an event is invalid whatever its hash says. The check counts
    the ``:`` of the bytes and of what is hashed (``runledger.schemas.ijson``), so it costs a fraction of the hash.
    """
    return _stored(raw, i_json=True)


def _stored(raw: bytes, *, i_json: bool) -> tuple[dict[str, Any], Any, str]:
    _floats.clear()
    event = _DECODER.decode(raw)
    if type(event) is not dict:
        raise msgspec.DecodeError(f"a JSON {type(event).__name__}, not an object")
    hashed = "hash" in event
    carried = event.pop("hash", None)
    out = None
    if not _floats and _bmp_only(raw):
        try:
            out = orjson.dumps(event, option=orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER)
        except orjson.JSONEncodeError:
            out = None  # beyond ±(2^53 - 1), or a lone surrogate: canonical decides
    if out is None:
        out = canonical(event)
    if i_json:
        # The member left out of what is hashed counts too: its ":", and those of its value (a string, as a rule).
        colons = (out.count(b":") if not hashed else
                  out.count(b":") + 1 + carried.count(":") if type(carried) is str else None)
        problems = duplicate_members(raw, colons)
        if problems:
            raise DuplicateMember(problems, {**event, "hash": carried} if hashed else event)
    return event, carried, hashlib.sha256(out).hexdigest()


@dataclass(frozen=True, slots=True)
class Head:
    """The last event of a stream that is known: its ``seq`` and ``hash`` (seq 0: empty stream)."""

    seq: int = 0
    hash: str = GENESIS_HASH


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """Where a stream stops being intact, and why."""

    subject: str
    seq: int
    code: str  # hash_mismatch | seq_gap | seq_conflict | chain_broken
    reason: str


def link_error(head: Head, event: Mapping[str, Any]) -> tuple[str, str] | None:
    """Why ``event`` cannot follow ``head`` in its stream, as (code, reason), or None if it links."""
    seq, prevhash = event.get("seq"), event.get("prevhash")
    if not isinstance(seq, int):
        return "chain_broken", f"seq {seq!r} is not an integer"
    if seq <= head.seq:
        return "seq_conflict", f"seq {seq} is not after the head seq {head.seq}"
    if seq != head.seq + 1:
        return "seq_gap", f"seq {seq} follows seq {head.seq}: seq {head.seq + 1} is missing"
    if prevhash != head.hash:
        return "chain_broken", f"prevhash {prevhash} is not the hash {head.hash} of seq {head.seq}"
    return None


def verify_chain(events: Iterable[Mapping[str, Any]]) -> list[ChainBreak]:
    """Check streams for intactness; return the first break of each broken stream.

    ``events`` may interleave several streams (by ``subject``); each stream's
    events must come in log order. An empty list means every stream is intact:
    every event valid, ``seq`` 1..n with no gaps, every ``prevhash`` linked.
    """
    heads: dict[str, Head] = {}
    broken: dict[str, ChainBreak] = {}
    for event in events:
        subject = str(event.get("subject"))
        if subject in broken:
            continue
        raw_seq = event.get("seq")
        seq = raw_seq if isinstance(raw_seq, int) else -1
        computed = compute_hash(event)
        if event.get("hash") != computed:
            broken[subject] = ChainBreak(
                subject, seq, "hash_mismatch", f"hash {event.get('hash')} but content hashes to {computed}"
            )
            continue
        head = heads.get(subject, Head())
        error = link_error(head, event)
        if error is not None:
            broken[subject] = ChainBreak(subject, seq, *error)
            continue
        heads[subject] = Head(seq, computed)
    return list(broken.values())
