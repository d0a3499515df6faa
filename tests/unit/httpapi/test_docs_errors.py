"""docs/http.md's Errors section lists every problem code and status the server answers (streams/http/*.py)."""

from __future__ import annotations

import re
from pathlib import Path

from runledger.streams.http.app import _HTTP_CODES

ROOT = Path(__file__).parents[3]


def documented() -> set[tuple[int, str]]:
    """(status, code) of each row of the Errors section's table (a row may name several codes)."""
    text = (ROOT / "docs" / "http.md").read_text()
    section = text[text.index("## Errors"):text.index("## Appending")]
    rows = set()
    for line in section.splitlines():
        found = re.match(r"\| (\d{3}|4xx) \| ([^|]+) \|", line)
        if found:
            for code in re.findall(r"`([a-z_]+)`", found[2]):
                rows.add((0 if found[1] == "4xx" else int(found[1]), code))
    return rows


def answered() -> set[tuple[int, str]]:
    """(status, code) of every ``Problem(status, "code", ...)`` written in streams/http, and Starlette's refusals."""
    source = "\n".join(p.read_text() for p in sorted((ROOT / "streams" / "http").glob("*.py")))
    out = {(int(status), code) for status, code in re.findall(r'Problem\(\s*(\d{3}),\s*"([a-z_]+)"', source)}
    return out | {(status, code) for status, code in _HTTP_CODES.items()} | {(0, "http_error")}


def test_every_code_the_server_answers_is_in_the_errors_table() -> None:
    missing = answered() - documented()
    assert not missing, f"docs/http.md, Errors, lacks {sorted(missing)}"
    assert len(answered()) > 30
