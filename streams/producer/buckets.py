"""Token buckets in Redis, taken inside an append's first script: a rate limit costs no round trip of its own.

A bucket has ``rate_per_s`` tokens a second and holds at most ``burst``; it is one Redis hash (tokens, and when
they were counted) on Redis' clock (``TIME``), so processes with skewed clocks share it exactly, and it expires once
it would be full again. ``serve`` keeps one per source (``runledger.streams.http.ratelimit``) and hands the producer
an ``Admission``: the append's lease script takes the tokens when it takes the lease, or takes neither.
"""

from __future__ import annotations

from dataclasses import dataclass

from runledger.schemas.errors import TransientError

__all__ = ["TAKE_TOKENS_LUA", "Admission", "RateLimited"]


@dataclass(frozen=True, slots=True)
class Admission:
    """Take ``n`` tokens from the bucket ``key`` (``rate_per_s``, ``burst``) before appending, or append nothing."""

    key: str
    rate_per_s: float
    burst: int
    n: int


class RateLimited(TransientError):
    """The bucket lacked the tokens: nothing was appended and nothing taken; they are there in ``wait_s``."""

    code = "rate_limited"

    def __init__(self, message: str, wait_s: float) -> None:
        super().__init__(message)
        self.wait_s = wait_s


# take_tokens(key, rate, burst, n): {1, 0} (taken) or {0, ms until they would be there} (none taken).
TAKE_TOKENS_LUA = """
local function take_tokens(key, rate, burst, n)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local held = redis.call('HMGET', key, 'tokens', 'at')
  local tokens, at = tonumber(held[1]), tonumber(held[2])
  if tokens == nil or at == nil then tokens, at = burst, now end
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
  local ttl = math.ceil(burst / rate * 1000) + 1000
  local taken = tokens >= n
  if taken then tokens = tokens - n end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('PEXPIRE', key, ttl)
  if taken then return {1, 0} end
  return {0, math.ceil((n - tokens) / rate * 1000)}
end
"""
