"""What of a record may reach an operator's terminal or a log: its text with the characters that drive a terminal
written out, wherever the command line prints it or any code of the process logs it.

A record's bytes are anyone's: a subject, an identifier, a member name or an error message quoting them may hold ESC
and the sequences it starts (colours, a cleared screen, a window title, OSC 8 links, OSC 52 writes to the
clipboard), the C1 controls that some terminals read as ESC sequences, a newline that forges a log line of its own,
or bidirectional overrides that show text in another order than it is. ``terminal_safe`` writes each as
``\\uXXXX``; ``escape_log_records`` does it to every log record the process makes.
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["escape_log_records", "terminal_safe"]

# C0 and C1 controls (a newline and a tab kept where ``lines`` says so), and the bidirectional overrides that
# reorder what a terminal shows.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: object, *, lines: bool = False) -> str:
    """``text`` as a terminal may show it: every control character (ESC, BEL, the C1 set, a newline...) and
    bidirectional override written as ``\\uXXXX``; with ``lines``, newlines and tabs are kept.

    JSON text stays the same JSON: ``\\uXXXX`` is JSON's own escape, and JSON text holds such characters only
    inside its strings."""
    return (_UNSAFE if lines else _UNSAFE_LINE).sub(lambda m: f"\\u{ord(m[0]):04x}", str(text))


def escape_log_records() -> None:
    """From now on, every log record of this process has its message written out by ``terminal_safe`` (one line),
    and its traceback too (newlines kept), whichever logger, handler or formatter. Called once by the command line
    before anything logs; calling it again changes nothing."""
    make = logging.getLogRecordFactory()
    if getattr(make, "escapes", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            record.msg, record.args = terminal_safe(record.getMessage()), ()
        except Exception:  # noqa: BLE001, S110 - a message that cannot be formatted: logging reports it as it is
            pass
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = terminal_safe(logging.Formatter().formatException(record.exc_info), lines=True)
        return record

    factory.escapes = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
