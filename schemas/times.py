"""Times in the wire contract: an RFC 3339 date-time in UTC (SPEC.md section 2), read strictly (a leap second as the
minute's last microsecond) and written as producers write it. Pure: no I/O."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

__all__ = ["UtcTime", "format_time", "parse_utc_time"]


class UtcTime(datetime):
    """An RFC 3339 date-time in UTC (``Z`` or ``+00:00``), timezone-aware in Python."""

    __slots__ = ()


def parse_utc_time(value: object) -> UtcTime:
    """``value`` as a UTC time; ValueError saying why if it is not an RFC 3339 date-time in UTC."""
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 string such as \"2026-11-22T10:00:00.125Z\"")
    try:
        parsed = UtcTime.fromisoformat(value)
    except ValueError:
        leap = _leap_second(value)
        if leap is None:
            raise ValueError(f"{value!r} is not an RFC 3339 date-time") from None
        return leap
    if parsed.tzinfo is UTC and value[10:11] == "T":  # the usual form, as producers write it
        return parsed
    if "T" not in value.upper() or parsed.tzinfo is None:
        raise ValueError(f"{value!r} is not an RFC 3339 date-time with a UTC offset")
    if parsed.utcoffset() != timedelta(0):
        raise ValueError(f"{value!r} is not in UTC (use Z or +00:00)")
    return parsed if parsed.tzinfo is UTC else parsed.replace(tzinfo=UTC)


_LEAP = re.compile(r"(\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}):60(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def _leap_second(value: str) -> UtcTime | None:
    """A leap second (RFC 3339 section 5.7: second 60 of 23:59 UTC) as the minute's last microsecond, as SPEC.md
    section 2 says; None if ``value`` is not one."""
    match = _LEAP.fullmatch(value)
    if match is None:
        return None
    try:
        moment = UtcTime.fromisoformat(f"{match[1]}:59{match[3].upper()}").astimezone(UTC)
    except ValueError:
        return None
    if (moment.hour, moment.minute) != (23, 59):
        return None
    return moment.replace(microsecond=999_999)


def format_time(moment: datetime) -> str:
    """The RFC 3339 UTC form producers write: millisecond precision, ``Z`` suffix."""
    if moment.tzinfo is None:
        raise ValueError("time must be timezone-aware")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
