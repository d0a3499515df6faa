"""``runledger hash`` and ``runledger produce``: events read as JSON lines, hashed to debug a producer or appended."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from runledger.schemas.chain import canonical, compute_hash
from runledger.schemas.errors import PermanentError, RunledgerError
from runledger.schemas.events import decode_event, decode_json, parse_event
from runledger.streams.cli.common import EXIT_INVALID, InputError, Subparsers, emit, input_lines
from runledger.streams.settings import Settings

if TYPE_CHECKING:
    from runledger.streams.producer.client import Appended
    from runledger.streams.producer.events import NewEvent

__all__ = ["hash_report", "read_produce_input", "register"]


def register(sub: Subparsers) -> None:
    hsh = sub.add_parser("hash", help="show the canonical form and hash of events, to debug a producer",
                         description="Reads events (one JSON object a line) and prints for each a JSON line "
                         '{"id", "hash" (computed), "canonical" (the JCS text that is hashed), "valid", "error"}. '
                         "Exit status 1 if any event is invalid.")
    hsh.add_argument("file", nargs="?", default="-", help="file of events (default: stdin)")
    hsh.set_defaults(func=_cmd_hash)

    prod = sub.add_parser("produce", help="append events read as JSON lines",
                          description='Reads {"stream", "type", "data"} objects (optional "idempotency_key", '
                          '"time"), one a line, validates all of them, then appends them in order per stream. '
                          "One invalid line and nothing is published.")
    prod.add_argument("file", nargs="?", default="-", help="file of events (default: stdin)")
    prod.add_argument("--json", action="store_true", help="print each appended event as a JSON line")
    prod.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    prod.set_defaults(func=_cmd_produce)


# hash -----------------------------------------------------------------------------------------

def hash_report(line: str) -> dict[str, Any]:
    """The ``runledger hash`` verdict on one line of input; a line over 512 KiB is ``too_large``."""
    try:
        raw = decode_event(line.rstrip("\r\n"))  # the line's end is not part of the event
    except RunledgerError as e:
        return {"id": None, "hash": None, "canonical": None, "valid": False, "error": f"{e.code}: {e}"}
    try:
        text: str | None = canonical(raw).decode()
        computed: str | None = compute_hash(raw)
    except (TypeError, ValueError) as e:  # numbers JCS cannot represent
        text = computed = None
        error: str | None = f"invalid_event: {e}"
    else:
        error = None
    if error is None:
        try:
            parse_event(raw)
        except RunledgerError as e:
            error = f"{e.code}: {e}"
    return {"id": raw.get("id"), "hash": computed, "canonical": text, "valid": error is None, "error": error}


def _cmd_hash(args: argparse.Namespace, settings: Settings) -> int:
    invalid = 0
    for _, line in input_lines(args.file):
        report = hash_report(line)
        invalid += not report["valid"]
        emit(report)
    return EXIT_INVALID if invalid else 0


# produce --------------------------------------------------------------------------------------

_PRODUCE_FIELDS = {"stream", "type", "data", "idempotency_key", "time"}


def read_produce_input(lines: Iterator[tuple[int, str]]) -> list[tuple[str, NewEvent]]:
    """Parse and validate every line first: one bad line and nothing is published."""
    from runledger.streams.producer.events import NewEvent, check_new_events  # imported when producing only

    out = []
    for number, line in lines:
        try:
            obj = decode_json(line)
            unknown = sorted(set(obj) - _PRODUCE_FIELDS)
            if unknown:
                raise InputError(f"{unknown[0]}: unknown field; a line has {', '.join(sorted(_PRODUCE_FIELDS))}")
            for required in ("stream", "type", "data"):
                if required not in obj:
                    raise InputError(f"{required}: missing")
            at = obj.get("time")
            event = NewEvent(obj["type"], obj["data"], obj.get("idempotency_key"),
                             datetime.fromisoformat(at) if isinstance(at, str) else None)
            check_new_events(obj["stream"], [event])
        except (RunledgerError, ValueError) as e:
            raise InputError(f"line {number}: {e}") from None
        out.append((obj["stream"], event))
    return out


def _cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.producer.client import append_many

    items = read_produce_input(input_lines(args.file))
    started = time.monotonic()

    def show(appended: Appended) -> None:
        emit({"stream": appended.stream_id, "seq": appended.seq, "id": appended.id, "hash": appended.hash,
              "duplicate": appended.duplicate})

    try:
        streams = asyncio.run(append_many(settings, items, on_appended=show if args.json else None,
                                          progress=not args.quiet))
    except PermanentError as e:  # refused for what it is (the stream's lifecycle, say): say why, by its code
        raise InputError(f"{e.code}: {e}") from None
    elapsed = time.monotonic() - started
    print(f"appended {len(items)} events to {streams} streams in {elapsed:.2f} s "
          f"({len(items) / max(elapsed, 1e-9):,.0f} events/s) on topic {settings.events_topic}", file=sys.stderr)
    return 0
