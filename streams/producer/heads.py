"""Per-stream chain heads in Redis: the append lease, staged batches, idempotency keys.

One producer at a time holds a stream's *lease* (a Redis key with a TTL, like
an event store's single writer per stream). Under it, the producer reads the
head (seq, hash), *stages* the complete batch it is about to publish, publishes
it, and *commits* (head advanced, idempotency keys recorded, batch and lease
dropped) in one Lua script. A producer that dies leaves a staged batch behind;
once its lease expires, the next producer *rolls it forward*: publishes the very
same bytes again (same event ids and hashes, so any copy already in the log is
a duplicate, never a fork) and commits it before appending its own events.
The streams with a staged batch are kept in the set ``<prefix>:staged`` by the
stage and commit scripts, for the sweeper (``runledger.streams.producer.sweeper``).

Reading the head and staging both check, inside their scripts, that the heads'
epoch names this run of Redis (``runledger.streams.producer.epoch``): an append
never goes on from heads that a restart or a flush may have lost.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import orjson
from redis.asyncio import Redis

from runledger.schemas.chain import Head
from runledger.schemas.errors import TransientError
from runledger.schemas.lifecycle import TERMINAL_TYPES
from runledger.streams import metrics
from runledger.streams.producer.buckets import TAKE_TOKENS_LUA, Admission, RateLimited
from runledger.streams.producer.epoch import EPOCH_LUA, RELEASE_IF_HELD, epoch_key

__all__ = ["RELEASE_IF_HELD", "AppendRef", "LeaseLost", "StagedBatch", "StreamBusy", "StreamHeads", "StreamState",
           "parse_head"]

T = TypeVar("T")


class StreamBusy(TransientError):
    """Another producer held the stream's append lease for longer than we could wait. Retry later."""

    code = "stream_busy"


class LeaseLost(TransientError):
    """Our lease expired before the batch was staged; nothing was published. Retry the append."""

    code = "lease_lost"


@dataclass(frozen=True, slots=True)
class AppendRef:
    """Where an appended event stands in its stream."""

    seq: int
    id: str
    hash: str


@dataclass(frozen=True, slots=True)
class StagedBatch:
    """A batch reserved in Redis before it is published: everything needed to publish it again."""

    batch_id: str
    values: list[bytes]
    refs: list[AppendRef]
    idempotency_keys: list[str | None]
    last_type: str = ""  # the type of its last event: the head records it for the lifecycle checks

    def prefix(self, count: int) -> StagedBatch:
        """Its first ``count`` events, as the same batch (to commit what the broker took of it)."""
        last_type = orjson.loads(self.values[count - 1]).get("type", "") if count else ""
        return StagedBatch(self.batch_id, self.values[:count], self.refs[:count], self.idempotency_keys[:count],
                           last_type)

    def encode(self) -> bytes:
        return orjson.dumps({
            "batch": self.batch_id,
            "values": [v.decode() for v in self.values],
            "refs": [[r.seq, r.id, r.hash] for r in self.refs],
            "keys": self.idempotency_keys,
            "type": self.last_type,
        })

    @classmethod
    def decode(cls, blob: bytes) -> StagedBatch:
        obj = orjson.loads(blob)
        return cls(obj["batch"], [v.encode() for v in obj["values"]],
                   [AppendRef(*r) for r in obj["refs"]], obj["keys"], obj.get("type", ""))


# The state of a stream: its head, the batch staged, whether the epoch is current, the idempotency keys of ARGV from
# ``first`` on that are known.
_READ_STATE = """
local function read_state(head, pending, epoch, idempotency, first)
  local known = {}
  for i = first, #ARGV do known[i - first + 1] = redis.call('HGET', idempotency, ARGV[i]) end
  return {redis.call('HGETALL', head), redis.call('HGET', pending, 'blob'), epoch_current(epoch) and 1 or 0, known}
end
"""

# KEYS: head, pending, epoch, idempotency. ARGV: the idempotency keys asked for.
_READ = EPOCH_LUA + _READ_STATE + """
return read_state(KEYS[1], KEYS[2], KEYS[3], KEYS[4], 1)
"""

# KEYS: lease, head, pending, epoch, idempotency, token bucket. ARGV: token, lease ms, the bucket's rate, burst and
# tokens wanted (0: no bucket), the idempotency keys asked for. Takes the lease (and the tokens) and reads the state
# under it in one round trip; nil if another holds the lease; {'limited', ms} (the lease given back, no token taken)
# if the bucket lacks the tokens.
_ACQUIRE_READ = EPOCH_LUA + TAKE_TOKENS_LUA + _READ_STATE + """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
if tonumber(ARGV[5]) > 0 then
  local taken = take_tokens(KEYS[6], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
  if taken[1] == 0 then
    redis.call('DEL', KEYS[1])
    return {'limited', taken[2]}
  end
end
return read_state(KEYS[2], KEYS[3], KEYS[4], KEYS[5], 6)
"""

# KEYS: lease, pending, epoch, staged. ARGV: token, batch id, blob, stream id. Asked again after its reply was lost,
# it answers 1 if it staged the batch the first time (whatever became of the lease or the epoch since).
_STAGE = EPOCH_LUA + """
if redis.call('HGET', KEYS[2], 'batch') == ARGV[2] then return 1 end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if not epoch_current(KEYS[3]) then return -2 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
redis.call('HSET', KEYS[2], 'batch', ARGV[2], 'blob', ARGV[3])
redis.call('SADD', KEYS[4], ARGV[4])
return 1
"""

# KEYS: pending, head, idempotency, lease, staged. ARGV: batch id, last seq, last hash, token, last type, how long
# the idempotency keys live from now in ms (0: for ever; set once the stream has ended), stream id, key/value
# pairs... Needs no epoch: a batch still staged was staged on a head that Redis still has.
_COMMIT = """
local committed = 0
if redis.call('HGET', KEYS[1], 'batch') == ARGV[1] then
  redis.call('HSET', KEYS[2], 'seq', ARGV[2], 'hash', ARGV[3], 'type', ARGV[5])
  for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
  if tonumber(ARGV[6]) > 0 then redis.call('PEXPIRE', KEYS[3], ARGV[6]) end
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[5], ARGV[7])
  committed = 1
end
if redis.call('GET', KEYS[4]) == ARGV[4] then redis.call('DEL', KEYS[4]) end
return committed
"""

# KEYS: pending, staged. ARGV: batch id, stream id. A batch the broker refuses for good is dropped, never published
# again; a stream in the set without a staged batch leaves it.
_DISCARD = """
if redis.call('HGET', KEYS[1], 'batch') == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[2]) end
return 0
"""


def parse_head(raw: dict[Any, Any]) -> tuple[Head, str | None]:
    """A head as HGETALL gives it (empty: none) and the type of its last event (None: not recorded)."""
    if not raw:
        return Head(), None
    return Head(int(raw[b"seq"]), raw[b"hash"].decode()), raw[b"type"].decode() if b"type" in raw else None


@dataclass(frozen=True, slots=True)
class StreamState:
    """A stream in Redis: its committed head and the type of that event (None: not recorded), a batch left
    staged by another producer, the known idempotency keys asked for, and whether Redis holds every head
    (``complete``: the epoch is current; else a head proves nothing, see ``runledger.streams.producer.recovery``)."""

    head: Head
    last_type: str | None
    left_behind: StagedBatch | None
    known: dict[str, AppendRef]
    complete: bool


def _state(reply: list[Any], keys: list[str]) -> StreamState:
    """A ``StreamState`` from ``read_state``'s reply (``keys``: the idempotency keys asked for)."""
    head_flat, blob, complete, found = reply
    head, last_type = parse_head({head_flat[i]: head_flat[i + 1] for i in range(0, len(head_flat), 2)})
    known = {k: AppendRef(*orjson.loads(v)) for k, v in zip(keys, found, strict=True) if v is not None}
    return StreamState(head, last_type, StagedBatch.decode(blob) if blob else None, known, bool(complete))


class StreamHeads:
    """The Redis side of appending: see the module docstring for the protocol."""

    def __init__(self, redis: Redis, prefix: str, lease_ms: int, *, ended_keys_ms: int = 7 * 86_400_000) -> None:
        self._redis = redis
        self._prefix = prefix
        self._lease_ms = lease_ms
        self._ended_keys_ms = ended_keys_ms
        self._staged = f"{prefix}:staged"
        self._read = redis.register_script(_READ)
        self._acquire_read = redis.register_script(_ACQUIRE_READ)
        self._stage = redis.register_script(_STAGE)
        self._commit = redis.register_script(_COMMIT)
        self._discard = redis.register_script(_DISCARD)
        self._release = redis.register_script(RELEASE_IF_HELD)

    def _key(self, kind: str, stream_id: str) -> str:
        return f"{self._prefix}:{kind}:{stream_id}"

    async def _leased(self, stream_id: str, wait_s: float, take: Callable[[], Awaitable[T | None]]) -> T:
        """``take()`` until it takes the stream's append lease (not None), waiting up to ``wait_s``; StreamBusy
        after that."""
        started, pause = time.monotonic(), 0.001
        try:
            while (taken := await take()) is None:
                if time.monotonic() >= started + wait_s:
                    raise StreamBusy(f"stream {stream_id!r}: another producer held the append lease for over "
                                     f"{wait_s} s")
                await asyncio.sleep(pause * (0.5 + random.random()))  # noqa: S311 - jitter, not security
                pause = min(pause * 2, 0.05)
            return taken
        finally:
            metrics.LEASE_WAIT_SECONDS.observe(time.monotonic() - started)

    async def acquire(self, stream_id: str, token: str, wait_s: float) -> None:
        """Take the stream's append lease, waiting up to ``wait_s``; raise StreamBusy after that."""
        key = self._key("lease", stream_id)

        async def take() -> bool | None:
            return bool(await self._redis.set(key, token, nx=True, px=self._lease_ms)) or None

        await self._leased(stream_id, wait_s, take)

    async def acquire_read(self, stream_id: str, token: str, wait_s: float, keys: list[str],
                           admission: Admission | None = None) -> StreamState:
        """``acquire``, then ``read`` under the lease, in one round trip each try; with ``admission``, its tokens
        taken with the lease, or RateLimited (neither taken)."""
        names = [self._key(kind, stream_id) for kind in ("lease", "head", "pending")]
        bucket = ([admission.key], [repr(admission.rate_per_s), admission.burst, admission.n]) if admission else (
            [self._key("nobucket", stream_id)], [0, 0, 0])

        async def take() -> StreamState | None:
            reply = await self._acquire_read(
                keys=[*names, epoch_key(self._prefix), self._key("idem", stream_id), *bucket[0]],
                args=[token, self._lease_ms, *bucket[1], *keys])
            if reply is None:
                return None
            if reply[0] == b"limited":
                wait_s = int(reply[1]) / 1000
                raise RateLimited(f"{admission.n if admission else 0} tokens more in {wait_s:.3f} s", wait_s)
            return _state(reply, keys)

        return await self._leased(stream_id, wait_s, take)

    async def release(self, stream_id: str, token: str) -> None:
        await self._release(keys=[self._key("lease", stream_id)], args=[token])

    async def read(self, stream_id: str, keys: list[str]) -> StreamState:
        """What Redis knows of the stream now (see ``StreamState``)."""
        return _state(await self._read(keys=[self._key("head", stream_id), self._key("pending", stream_id),
                                             epoch_key(self._prefix), self._key("idem", stream_id)], args=keys), keys)

    async def stage(self, stream_id: str, token: str, batch: StagedBatch) -> bool:
        """Record ``batch`` as about to be published. False: the epoch is not current (Redis restarted or lost its
        data since the head was read: recover the heads first); LeaseLost if our lease is gone."""
        done = await self._stage(
            keys=[self._key("lease", stream_id), self._key("pending", stream_id), epoch_key(self._prefix),
                  self._staged],
            args=[token, batch.batch_id, batch.encode(), stream_id],
        )
        if done == -2:
            return False
        if done != 1:
            raise LeaseLost(f"stream {stream_id!r}: the append lease expired before the batch was staged")
        return True

    async def staged_streams(self) -> list[str]:
        """The streams with a batch staged now (by a producer at work, or one that failed or died)."""
        return sorted(member.decode() for member in cast("set[bytes]", await self._redis.smembers(self._staged)))

    async def discard(self, stream_id: str, batch_id: str) -> None:
        """Drop the batch ``batch_id``, staged but refused by the broker for good (nothing of it is in the log); the
        stream leaves the staged set if nothing is staged for it."""
        await self._discard(keys=[self._key("pending", stream_id), self._staged], args=[batch_id, stream_id])

    async def commit(self, stream_id: str, token: str, batch: StagedBatch) -> bool:
        """Advance the head past ``batch`` and release the lease. False: someone else committed it."""
        pairs: list[str | bytes] = []
        for key, ref in zip(batch.idempotency_keys, batch.refs, strict=True):
            if key is not None:
                pairs += [key, orjson.dumps([ref.seq, ref.id, ref.hash])]
        last = batch.refs[-1]
        done = await self._commit(
            keys=[*(self._key(k, stream_id) for k in ("pending", "head", "idem", "lease")), self._staged],
            args=[batch.batch_id, last.seq, last.hash, token, batch.last_type,
                  self._ended_keys_ms if batch.last_type in TERMINAL_TYPES else 0, stream_id, *pairs],
        )
        return bool(done)
