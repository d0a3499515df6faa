"""What every command group of the command line shares: exit codes, the input error, JSON output, input lines,
times given on the command line, and the confirmation prompt."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import IO, Any, TypeAlias

import orjson

from runledger.schemas.errors import RunledgerError
from runledger.streams.terminal import terminal_safe

__all__ = ["EXIT_INVALID", "EXIT_TIMEOUT", "EXIT_TRANSIENT", "EXIT_USAGE", "InputError", "Subparsers", "confirm",
           "emit", "input_lines", "utc_time"]

EXIT_INVALID, EXIT_USAGE, EXIT_TRANSIENT, EXIT_TIMEOUT = 1, 2, 3, 4

# argparse keeps the type of add_subparsers() private; the alias keeps each group's ``register`` readable.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class InputError(RunledgerError):
    """A line of input is not usable; the message names the line and the field."""


def emit(obj: Any) -> None:
    """One JSON object a line on stdout, the same JSON with what a record's strings hold that could drive a
    terminal (C1 controls, bidirectional overrides: orjson escapes only C0) written as ``\\uXXXX``."""
    sys.stdout.write(terminal_safe(orjson.dumps(obj, default=str).decode()) + "\n")


def input_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of each non-blank line of ``path``, or of stdin for ``-``."""
    stream: IO[str] = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    with stream:
        for number, line in enumerate(stream, start=1):
            if line.strip():
                yield number, line


def utc_time(text: str) -> datetime:
    """An argument's time: ISO 8601 with its UTC offset (a time without one would be read in local time)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time such as 2026-11-22T10:00:00Z") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset: write it as 2026-11-22T10:00:00Z")
    return moment


def confirm(question: str) -> bool:
    """Ask on the terminal; without one, refuse rather than guess (the caller offers ``--yes``)."""
    if not sys.stdin.isatty():
        raise InputError("stdin is not a terminal to confirm on: add --yes")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
