"""What of a record reaches a terminal or a log: its control characters written out, nothing lost."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from runledger.streams.terminal import escape_log_records, terminal_safe

HOSTILE = "\x1b]0;owned\x07\x1b[2J\x9b31m\u202e\nforged\tline\x00"


def test_every_control_and_override_is_written_out_and_lines_keep_newlines_and_tabs() -> None:
    written = "\\u001b]0;owned\\u0007\\u001b[2J\\u009b31m\\u202e"
    assert terminal_safe(HOSTILE) == written + "\\u000aforged\\u0009line\\u0000"
    assert terminal_safe(HOSTILE, lines=True) == written + "\nforged\tline\\u0000"
    assert terminal_safe("übersetzung 日本 ✓") == "übersetzung 日本 ✓"  # text is not a control


def test_json_text_stays_the_same_json() -> None:
    obj = {HOSTILE: [HOSTILE, {"k": "\\" + HOSTILE}], "plain": "\\u001b"}
    text = terminal_safe(orjson.dumps(obj).decode())
    assert orjson.loads(text) == obj and "\x9b" not in text and "\u202e" not in text


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing to a buffer, under this process's record factory as ``escape_log_records`` leaves it."""
    factory = logging.getLogRecordFactory()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("runledger.test.terminal")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        escape_log_records()
        escape_log_records()  # once is enough: a second call wraps nothing twice
        yield logger, out
    finally:
        logger.removeHandler(handler)
        logging.setLogRecordFactory(factory)


def test_a_log_line_and_its_traceback_carry_no_control_of_a_record(logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = logged
    logger.warning("dead letter %s: %s", 7, HOSTILE)
    try:
        raise ValueError(HOSTILE)
    except ValueError:
        logger.exception("failed on %r", "x")
    logger.warning("100%% of %d", 3)
    lines = out.getvalue().splitlines()
    assert lines[0] == "dead letter 7: " + terminal_safe(HOSTILE)
    assert lines[1] == "failed on 'x'" and lines[2] == "Traceback (most recent call last):"
    assert "ValueError: " + terminal_safe(HOSTILE, lines=True).splitlines()[0] in lines
    assert lines[-1] == "100% of 3"
    assert not any(c in out.getvalue() for c in "\x1b\x07\x9b\u202e\x00")
