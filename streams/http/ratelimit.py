"""Each source's rate limit: a token bucket in Redis, shared by every ``serve`` replica.

A source has ``rate_per_s`` tokens a second and holds at most ``burst``; each event appended takes one. The bucket
(``<prefix>:ratelimit:<source id>``) is taken from by the append's own lease script, with the lease
(``runledger.streams.producer.buckets``): no round trip of its own, and nothing taken for an append refused before.

For ingest: ``admission(svc, caller, n)`` once the request's ``n`` events are checked (a 429 ``Problem`` at once if
``n`` is over the burst), handed to the producer inside ``with refused_over_limit(caller, n):``, which turns the
producer's RateLimited into a 429 ``Problem`` with ``Retry-After`` (nothing appended, nothing taken).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from runledger.streams.http.caller import Caller
from runledger.streams.http.problems import Problem
from runledger.streams.http.services import Services
from runledger.streams.producer.buckets import Admission, RateLimited

__all__ = ["admission", "bucket_key", "refused_over_limit"]


def bucket_key(prefix: str, source_id: str) -> str:
    return f"{prefix}:ratelimit:{source_id}"


def admission(svc: Services, caller: Caller, n: int) -> Admission | None:
    """The tokens ``caller``'s append of ``n`` events takes, or None (no limit set). Raises a 429 Problem if ``n``
    is over the source's burst: such a request can never pass."""
    if caller.rate_per_s is None or caller.burst is None or n <= 0:
        return None
    if n > caller.burst:
        raise Problem(429, "rate_limited", f"{n} events in one request exceed the burst of source "
                      f"{caller.source_id} ({caller.burst}): send at most {caller.burst} per request",
                      title="too many events",
                      headers={"Retry-After": str(math.ceil(caller.burst / caller.rate_per_s))})
    return Admission(bucket_key(svc.settings.topic_prefix, caller.source_id), caller.rate_per_s, caller.burst, n)


@contextlib.contextmanager
def refused_over_limit(caller: Caller, n: int) -> Iterator[None]:
    """The producer's RateLimited inside, as the 429 Problem the client gets (``Retry-After`` in whole seconds)."""
    try:
        yield
    except RateLimited as e:
        raise Problem(429, "rate_limited", f"source {caller.source_id} may append {caller.rate_per_s:g} events a "
                      f"second ({caller.burst} at once): {n} more in {e.wait_s:.3f} s", title="too many events",
                      headers={"Retry-After": str(max(1, math.ceil(e.wait_s)))}) from e
