"""Each source's rate limit: a token bucket in Redis, shared by every ``serve`` replica.

A source has ``rate_per_s`` tokens a second and holds at most ``burst``; each event appended takes one. The bucket
is one Redis hash (``<prefix>:ratelimit:<source id>``: tokens, and when they were counted) updated by one Lua script,
atomically, on Redis' clock (``TIME``), so replicas with skewed clocks share it exactly. An idle bucket expires once
it would be full again.

For ingest: ``await take_tokens(svc, caller, n)`` once the request's ``n`` events are checked and before any is
appended; it returns, or raises a 429 ``Problem`` with ``Retry-After`` (nothing taken), or a TransientError (503)
when Redis cannot be reached.
"""

from __future__ import annotations

import math

from redis.asyncio import Redis

from runledger.streams.http.caller import Caller
from runledger.streams.http.problems import Problem
from runledger.streams.http.services import Services
from runledger.streams.producer.epoch import redis_errors

__all__ = ["bucket_key", "take", "take_tokens"]

# KEYS[1] the bucket; ARGV rate per second, burst, tokens wanted. Returns {1, 0} (taken) or {0, ms to wait}.
_TAKE_LUA = """
local rate, burst, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(held[1]), tonumber(held[2])
if tokens == nil or at == nil then tokens, at = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local ttl = math.ceil(burst / rate * 1000) + 1000
if tokens >= n then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - n), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {1, 0}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], ttl)
return {0, math.ceil((n - tokens) / rate * 1000)}
"""


def bucket_key(prefix: str, source_id: str) -> str:
    return f"{prefix}:ratelimit:{source_id}"


async def take(redis: Redis, key: str, rate_per_s: float, burst: int, n: int) -> float:
    """Take ``n`` tokens from the bucket ``key``: 0.0 if taken, else the seconds until they would be there (none
    taken). Raises redis-py's errors."""
    # EVALSHA (the script loaded once), not EVAL: Redis would hash the script's text at every request.
    taken, wait_ms = await redis.register_script(_TAKE_LUA)(keys=[key], args=[repr(rate_per_s), str(burst), str(n)])
    return 0.0 if int(taken) else int(wait_ms) / 1000


async def take_tokens(svc: Services, caller: Caller, n: int) -> None:
    """Take ``n`` events' tokens from ``caller``'s bucket, or refuse the request.

    Raises a 429 Problem (``rate_limited``, with ``Retry-After`` in whole seconds) if the bucket lacks them (a
    request of more events than the source's burst can never pass: its detail says so), or RedisUnavailable
    (transient: 503) if Redis fails. A caller without a limit (``rate_per_s`` None) always passes."""
    if caller.rate_per_s is None or caller.burst is None or n <= 0:
        return
    if n > caller.burst:
        raise Problem(429, "rate_limited", f"{n} events in one request exceed the burst of source "
                      f"{caller.source_id} ({caller.burst}): send at most {caller.burst} per request",
                      title="too many events",
                      headers={"Retry-After": str(math.ceil(caller.burst / caller.rate_per_s))})
    with redis_errors("take the source's rate-limit tokens"):
        wait_s = await take(svc.redis, bucket_key(svc.settings.topic_prefix, caller.source_id), caller.rate_per_s,
                            caller.burst, n)
    if wait_s > 0:
        raise Problem(429, "rate_limited", f"source {caller.source_id} may append {caller.rate_per_s:g} events a "
                      f"second ({caller.burst} at once): {n} more in {wait_s:.3f} s", title="too many events",
                      headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
