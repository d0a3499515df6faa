"""Who a request comes from: the source its credential belongs to, and what that source may do."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Caller"]


@dataclass(frozen=True, slots=True)
class Caller:
    """The source a verified request belongs to.

    ``source`` is the CloudEvents ``source`` the server writes into every event this caller appends (a producer
    cannot write as another). A caller may append to a stream whose id starts with one of ``append_prefixes``, and
    read one whose id starts with one of ``read_prefixes`` ("" grants every stream). ``rate_per_s`` and ``burst``:
    the source's token bucket (``runledger.streams.http.ratelimit``), in events appended; None: no limit.
    """

    source_id: str
    source: str
    append_prefixes: tuple[str, ...] = ()
    read_prefixes: tuple[str, ...] = ()
    rate_per_s: float | None = None
    burst: int | None = None

    def may_append(self, stream_id: str) -> bool:
        return any(stream_id.startswith(p) for p in self.append_prefixes)

    def may_read(self, stream_id: str) -> bool:
        return any(stream_id.startswith(p) for p in self.read_prefixes)
