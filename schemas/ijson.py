"""I-JSON (RFC 7493), as RFC 8785 requires of what it hashes: no object, at any depth, has two members of one name.

orjson and msgspec keep the last of two members of one name without a word, so that two parsers could read
different values under one hash (SPEC.md section 3). ``duplicate_members`` tells, after one of them has decoded
the text, whether the text had such a member, and names each. Pure: no I/O.

The usual case costs two byte counts: the text has one ``:`` per member, plus those written in its strings; the
decoded value, encoded again by orjson or rfc8785 (neither escapes ``:``), has one per member it kept, plus those
in its strings. A member that a repeated name dropped takes its ``:`` with it, so the two counts are equal exactly
when no name repeats, unless the text writes a ``:`` as the escape ``\\u003a``: then, or when the counts differ, the
text is parsed once more (Python's ``json``, keeping every member) to name the members. That second parser only
looks: what it reads is never used, so it accepts nothing that orjson or msgspec refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import orjson

from runledger.schemas.errors import FieldError

__all__ = ["duplicate_members", "encoded_colons"]


def encoded_colons(value: Any) -> int | None:
    """The ``:`` of ``value`` encoded by orjson (one per member, and those its strings hold), or None if orjson
    cannot encode it (nested too deeply, say)."""
    try:
        return orjson.dumps(value).count(b":")
    except orjson.JSONEncodeError:
        return None


def duplicate_members(text: bytes | str, colons: int | None) -> list[FieldError]:
    """Every member of the JSON ``text`` whose name its object already has, as (path, reason); [] if none.

    ``text`` is JSON that orjson or msgspec accepted; ``colons``: the ``:`` its decoded value has once encoded
    again (``encoded_colons``), or None if unknown: then ``text`` is parsed again to tell, which is slower.
    The path names the member as ``unsafe_values`` does (``data.input.x``), the reason its name in JSON form:
    ``duplicate member "x"``.
    """
    if isinstance(text, str):
        escaped = "\\" in text and "\\u003" in text
        written = text.count(":")
    else:
        escaped = 92 in text and b"\\u003" in text  # 92: "\\", found by memchr; the escape only if there is one
        written = text.count(b":")
    if colons is not None and not escaped and written == colons:
        return []
    try:
        value = json.loads(text, object_pairs_hook=_Object, parse_int=len, parse_float=len, parse_constant=len)
        return list(_repeated(value, ""))
    except RecursionError:
        return [("", "nested too deeply to be checked for members of one name")]
    except ValueError as e:  # not expected: orjson or msgspec accepted the text
        return [("", f"cannot be checked for members of one name: {e}")]


class _Object(dict[str, Any]):
    """An object as ``json`` reads it, with the names it holds more than once (``repeated``)."""

    __slots__ = ("repeated",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.repeated: list[str] = []
        if len(self) != len(pairs):
            seen: set[str] = set()
            for name, _ in pairs:
                if name in seen and name not in self.repeated:
                    self.repeated.append(name)
                seen.add(name)


def _repeated(value: Any, path: str) -> Iterator[FieldError]:
    if isinstance(value, _Object):
        for name in value.repeated:
            yield _at(path, name), f"duplicate member {orjson.dumps(name).decode()}"
        for name, item in value.items():
            yield from _repeated(item, _at(path, name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _repeated(item, f"{path}[{index}]")


def _at(path: str, name: str) -> str:
    if "\x00" in name:  # no raw NUL in a path, as unsafe_values writes it
        name = repr(name)[1:-1]
    return f"{path}.{name}" if path else name
