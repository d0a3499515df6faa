"""Reading and resolving dead letters: the filters and output of ``runledger dlq list|show|resolve``.

A dead letter is a row of ``dead_letters`` (the copy in ``<prefix>.events.dlq``
carries the same fields as headers). Output for scripts is one JSON object a
line with kcat's field names for the record (``topic``, ``partition``,
``offset``, ``key``, ``payload``, ``headers``, ``ts`` in epoch milliseconds),
where topic/partition/offset are the record's original place in the log.
"""

from __future__ import annotations

import base64
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from runledger.projections.postgres.queries import query
from runledger.schemas.events import format_time
from runledger.streams.worker.retry import header_values

__all__ = ["STATUSES", "LetterFilter", "letter_json", "parse_time", "resolve", "select_letters", "summary_by_reason"]

STATUSES = ("dead", "replayed", "resolved")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, now: datetime | None = None, option: str = "--since") -> datetime:
    """``2h``, ``30m``, ``1d``, ``90s`` (that long before now) or an RFC 3339 time, as an aware UTC datetime."""
    now = now or datetime.now(UTC)
    match = _DURATION.fullmatch(text.strip())
    if match:
        return now - timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{option}: {text!r} is neither a duration such as 90s, 30m, 2h, 1d, 1w nor an RFC 3339 "
                         "time such as 2026-11-22T10:00:00Z") from None
    if moment.tzinfo is None:
        raise ValueError(f"{option}: {text!r} has no time zone; add Z or an offset such as +01:00")
    return moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class LetterFilter:
    """Which dead letters a command works on; empty fields match everything."""

    ids: tuple[int, ...] = ()
    reasons: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    streams: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    statuses: tuple[str, ...] = ("dead",)
    limit: int | None = None

    def __post_init__(self) -> None:
        unknown = set(self.statuses) - set(STATUSES)
        if unknown:
            raise ValueError(f"--status: {', '.join(sorted(unknown))} is not one of {', '.join(STATUSES)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit: must be 1 or more, not {self.limit}")

    @property
    def narrows(self) -> bool:
        """Whether anything but the status narrows the selection."""
        return bool(self.ids or self.reasons or self.types or self.streams or self.since or self.until)

    def as_json(self) -> dict[str, Any]:
        return {k: (format_time(v) if isinstance(v, datetime) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items() if v not in ((), None)}

    def args(self) -> tuple[Any, ...]:
        return (list(self.ids) or None, list(self.reasons) or None, list(self.types) or None,
                list(self.streams) or None, self.since, self.until, list(self.statuses) or None, self.limit)


async def select_letters(conn: asyncpg.Connection, letters: LetterFilter) -> list[asyncpg.Record]:
    """The matching dead letters in replay order: by stream, then seq; letters of no known stream last."""
    rows: list[asyncpg.Record] = await conn.fetch(query("dlq_select"), *letters.args())
    return rows


def summary_by_reason(rows: list[asyncpg.Record]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def letter_json(row: asyncpg.Record, *, decoded: bool = False) -> dict[str, Any]:
    """A dead letter as one JSON object (see the module docstring); with ``decoded``, the event as JSON too."""
    value = bytes(row["value"])
    key = bytes(row["key"]) if row["key"] is not None else None
    out: dict[str, Any] = {
        "id": row["id"], "topic": row["topic"], "partition": row["partition"], "offset": row["offset"],
        "ts": int(row["created_at"].timestamp() * 1000),
        "key": key.decode("utf-8", "replace") if key is not None else None,
        **_payload(value),
        "headers": letter_headers(row),
        "reason": row["reason"], "error": row["error"], "attempts": row["attempts"],
        "first_failure": format_time(row["first_failure_at"]), "last_failure": format_time(row["last_failure_at"]),
        "stream": row["stream_id"], "claimed_stream": row["claimed_stream_id"], "seq": row["seq"],
        "event_id": row["event_id"], "type": row["event_type"],
        "status": row["status"], "status_at": format_time(row["status_at"]) if row["status_at"] else None,
        "status_by": row["status_by"], "note": row["note"], "replays": row["replays"],
        "dlq": ({"topic": row["dlq_topic"], "partition": row["dlq_partition"], "offset": row["dlq_offset"]}
                if row["dlq_topic"] else None),
    }
    if decoded:
        try:
            out["event"] = orjson.loads(value)
        except orjson.JSONDecodeError:
            out["event"] = None
    return out


def letter_headers(row: asyncpg.Record) -> dict[str, str]:
    """The ``runledger.*`` headers of the letter's copy in the dead-letter topic."""
    return header_values(
        reason=row["reason"], error=row["error"], attempts=row["attempts"], first_failure=row["first_failure_at"],
        last_failure=row["last_failure_at"], topic=row["topic"], partition=row["partition"], offset=row["offset"],
        stream=row["stream_id"], seq=row["seq"], event_id=row["event_id"], event_type=row["event_type"],
        dead_letter_id=row["id"], claimed_stream=row["claimed_stream_id"])


def _payload(value: bytes) -> dict[str, Any]:
    try:
        return {"payload": value.decode("utf-8")}
    except UnicodeDecodeError:
        return {"payload": base64.b64encode(value).decode(), "payload_encoding": "base64"}


async def resolve(conn: asyncpg.Connection, ids: list[int], note: str, by: str) -> list[int]:
    """Mark the open letters among ``ids`` resolved with ``note``; returns those changed. Nothing is deleted."""
    return [r["id"] for r in await conn.fetch(query("dlq_resolve"), ids, by, note)]
