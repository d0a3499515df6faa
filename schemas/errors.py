"""The exception tree every runledger failure belongs to.

Each class says, by ``transient``, whether the same work can succeed if tried
again later (retry) or never will (dead-letter / report to the caller), and by
``code``, a short stable name used in dead-letter records, metrics and JSON
output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

__all__ = [
    "ChainBroken",
    "DuplicateMember",
    "FieldError",
    "HashMismatch",
    "IdConflict",
    "IllegalTransition",
    "InvalidEvent",
    "InvalidJson",
    "PermanentError",
    "PredecessorMissing",
    "RetriesExhausted",
    "RunledgerError",
    "SeqConflict",
    "TooLarge",
    "TransientError",
    "UnknownType",
]

FieldError = tuple[str, str]
"""(dotted field path, reason) for one failed field, e.g. ("data.cost_usd", "...")."""


class RunledgerError(Exception):
    """Root of every error runledger raises on purpose."""

    transient: ClassVar[bool] = False
    code: ClassVar[str] = "error"


class TransientError(RunledgerError):
    """May succeed if tried again later: retry with backoff; nothing is lost."""

    transient = True
    code = "transient"


class PermanentError(RunledgerError):
    """Will fail the same way every time: fix the input (or the code), do not retry."""

    transient = False
    code = "permanent"


class InvalidJson(PermanentError):
    """The bytes are not one UTF-8 JSON object. The producer must send valid JSON."""

    code = "invalid_json"


class InvalidEvent(PermanentError):
    """The JSON is not a valid runledger event (SPEC.md sections 2, 4 and 5).

    ``errors`` lists every failed field with its reason; ``field`` is the first.
    Fix the producer so it sends the fields the spec requires.
    """

    code = "invalid_event"

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors: list[FieldError] = list(errors) or [("", "invalid event")]
        self.field, self.reason = self.errors[0]
        super().__init__("; ".join(f"{f or '(event)'}: {r}" for f, r in self.errors))


class DuplicateMember(InvalidEvent):
    """An object of the event, at some depth, has two members of one name: the event is not I-JSON (RFC 7493),
    which RFC 8785 and so the hash require (SPEC.md section 3), whatever its ``hash`` says. Two parsers could read
    different values under one hash. Fix the producer's JSON encoder; the event cannot be projected as it is.

    ``decoded``: the event as a parser that keeps the last member of a name reads it, to name its stream.
    """

    def __init__(self, errors: Sequence[FieldError], decoded: dict[str, Any] | None = None) -> None:
        super().__init__(errors)
        self.decoded = decoded


class UnknownType(InvalidEvent):
    """The event ``type`` is not one of SPEC.md section 5's types."""

    code = "unknown_type"


class TooLarge(InvalidEvent):
    """An encoded event is over 512 KiB (SPEC.md section 4): larger content belongs outside the log,
    named by an ``artifact.created`` ``uri``. Refused by a producer; dead-lettered by a worker."""

    code = "too_large"


class HashMismatch(PermanentError):
    """The event's ``hash`` does not match SHA-256 over its JCS form (SPEC.md section 3).

    Either the event was altered after it was hashed, or the producer hashes
    differently: compare with ``runledger hash``.
    """

    code = "hash_mismatch"

    def __init__(self, expected: str, actual: str) -> None:
        self.expected, self.actual = expected, actual
        super().__init__(f"hash: event carries {actual}, its content hashes to {expected}")


class ChainBroken(PermanentError):
    """An event does not link to its predecessor: wrong ``prevhash``, or ``seq`` 1 not first.

    The stream's history was rewritten or forked; investigate before replaying.
    """

    code = "chain_broken"


class SeqConflict(PermanentError):
    """A ``seq`` already taken in its stream by an event with a different hash (a fork)."""

    code = "seq_conflict"


class IdConflict(PermanentError):
    """The event's ``id`` is already taken by a projected event with another ``hash`` (SPEC.md section 6): not a
    copy of that event but another one. Ids are unique across the whole log: find the producer that reuses them
    (or forges them to hide another stream's event); the projected event stays as it is."""

    code = "id_conflict"


class IllegalTransition(PermanentError):
    """The event is not allowed in the stream's current state (SPEC.md section 5), e.g. an event
    after the execution ended, or a step event for a step that never started."""

    code = "illegal_transition"


class PredecessorMissing(TransientError):
    """The event's ``seq`` arrived before its predecessor was projected: retried until it is."""

    code = "predecessor_missing"


class RetriesExhausted(PermanentError):
    """A transient failure outlasted the retry schedule; the record is dead-lettered with the last error."""

    code = "retries_exhausted"
