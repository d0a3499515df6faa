"""Whether Redis still holds every chain head, and since where in the log: the heads' *epoch*.

The hash ``<prefix>:heads:epoch`` names the Redis run (``run_id``, new at every start of the server) in which
the heads were last proven complete, with a ``token`` of that proof and, per partition of the log, a checkpoint
``p<partition>``: the offset below which the heads reflect every event of the log. A restart of Redis (which
may lose its last writes: the append-only file synced once a second, a replica that lagged) changes the run id;
``FLUSHALL`` or a restart without data removes the hash with the heads. Every append's scripts compare the run
id they run in with the epoch's (``EPOCH_LUA``), so no append goes on from heads that may have been lost, however
soon after the loss it comes. The heads are then recovered from the log, from the checkpoints on
(``runledger.streams.producer.recovery``).

Checkpoints only move forward. Redis keeps its writes in order and loses, if anything, its last ones, so a
checkpoint that survives a restart was written after every head move it covers, and those survived too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from runledger.schemas.errors import TransientError

__all__ = ["EPOCH_LUA", "RELEASE_IF_HELD", "Epoch", "HeadsRecovering", "RedisLock", "RedisUnavailable",
           "advance_checkpoints", "epoch_key", "read_epoch", "redis_errors", "run_id"]

log = logging.getLogger(__name__)


class RedisUnavailable(TransientError):
    """Redis could not be reached or failed a command. Nothing was appended past what the error names; try again
    (with the same idempotency keys) once Redis answers."""

    code = "redis_unavailable"


class HeadsRecovering(TransientError):
    """Redis lost its chain heads (a restart, a flush), and their recovery from the log, by this producer or
    another, did not end within ``RUNLEDGER_PRODUCER_WAIT_S``. Nothing was appended. Try again: a recovery goes on
    from where the last one got (``runledger heads recover`` runs one to its end)."""

    code = "heads_recovering"


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Raise any redis-py error inside as RedisUnavailable, saying ``what`` failed."""
    try:
        yield
    except RedisError as e:
        raise RedisUnavailable(f"{what}: Redis failed ({type(e).__name__}: {e}); try again") from e


def epoch_key(prefix: str) -> str:
    return f"{prefix}:heads:epoch"


# Lua functions for the scripts: this run's id; whether the epoch names it (else heads may be lost: no append may go
# on from them); move the epoch's checkpoints forward to the partition/offset pairs of ARGV from ``first`` on.
EPOCH_LUA = """
local function run_id()
  return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
end
local function epoch_current(key)
  return redis.call('HGET', key, 'run_id') == run_id()
end
local function forward_checkpoints(key, first)
  for i = first, #ARGV, 2 do
    local name = 'p' .. ARGV[i]
    if tonumber(redis.call('HGET', key, name) or '-1') < tonumber(ARGV[i + 1]) then
      redis.call('HSET', key, name, ARGV[i + 1])
    end
  end
end
"""

_READ = EPOCH_LUA + """
return {epoch_current(KEYS[1]) and 1 or 0, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: epoch. ARGV: token, then partition/offset pairs. Only within the epoch of that token.
_ADVANCE = EPOCH_LUA + """
if not epoch_current(KEYS[1]) or redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
forward_checkpoints(KEYS[1], 2)
return 1
"""


@dataclass(frozen=True, slots=True)
class Epoch:
    """The epoch as Redis holds it: ``current`` if it names this run of Redis (every head is there)."""

    current: bool
    token: str | None
    checkpoints: dict[int, int]


async def read_epoch(redis: Redis, prefix: str) -> Epoch:
    current, flat = await redis.register_script(_READ)(keys=[epoch_key(prefix)])
    fields = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
    checkpoints = {int(k[1:]): int(v) for k, v in fields.items() if k.startswith("p")}
    return Epoch(bool(current), fields.get("token"), checkpoints)


async def run_id(redis: Redis) -> str:
    return str((await redis.info("server"))["run_id"])


async def advance_checkpoints(redis: Redis, prefix: str, token: str, ends: Mapping[int, int]) -> bool:
    """Move the checkpoints forward to ``ends`` if the epoch is still the one of ``token``."""
    pairs = [x for partition, offset in sorted(ends.items()) for x in (partition, offset)]
    return bool(await redis.register_script(_ADVANCE)(keys=[epoch_key(prefix)], args=[token, *pairs]))


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

RELEASE_IF_HELD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLock:
    """A lock in Redis that lapses ``ttl_ms`` after its holder last renewed it: a holder that dies or hangs holds
    nobody back for long."""

    def __init__(self, redis: Redis, key: str, ttl_ms: int) -> None:
        self.key, self.token, self._redis, self._ttl_ms = key, uuid.uuid4().hex, redis, ttl_ms
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(RELEASE_IF_HELD)

    async def acquire(self) -> bool:
        return bool(await self._redis.set(self.key, self.token, nx=True, px=self._ttl_ms))

    async def renew(self) -> bool:
        return bool(await self._renew(keys=[self.key], args=[self.token, self._ttl_ms]))

    async def hold(self) -> bool:
        """Renew the lock if held, else take it if free; whether it is held now."""
        return await self.renew() or await self.acquire()

    async def release(self) -> None:
        await self._release(keys=[self.key], args=[self.token])

    @contextlib.asynccontextmanager
    async def renewed(self) -> AsyncIterator[None]:
        """Keep renewing the (acquired) lock while the block runs; release it afterwards."""
        async def renew_forever() -> None:
            while True:
                await asyncio.sleep(self._ttl_ms / 3000)
                try:
                    if not await self.renew():
                        log.warning("lost the lock %s: another process may hold it now", self.key)
                        return
                except RedisError as e:
                    log.warning("renewing the lock %s: %s", self.key, e)

        renewing = asyncio.create_task(renew_forever())
        try:
            yield
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
            with contextlib.suppress(RedisError):
                await self.release()
