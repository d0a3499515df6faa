"""Chain heads that cannot fork: recovering Redis's heads from the log.

When the heads' epoch (``runledger.streams.producer.epoch``) does not name the Redis run that an append runs in,
Redis may have lost heads, and a missing or older head proves nothing: the append recovers them first. One
producer at a time recovers (the others wait for it, each up to its deadline): it reads each partition of the
log from its checkpoint (offset 0 where there is none, after a flush) to its end, follows each stream's chain
from the head Redis has, as a worker does (``runledger.streams.producer.chains``: in log order, the first branch
wins), and moves each head forward, never back. What it has read is checkpointed as it goes, so a recovery cut
short by its deadline is taken up where it stopped. Then it marks the epoch current again.
``runledger heads recover`` recovers on demand; ``runledger heads check`` (``runledger.streams.tools.heads``)
compares Redis, the log and PostgreSQL; ``runledger heads repair`` (``runledger.streams.producer.repair``) moves a
head that a fork put on the wrong branch back onto the first.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from redis.asyncio import Redis

from runledger.schemas.chain import GENESIS_HASH
from runledger.streams.producer.chains import Chain, LoggedEvent, by_stream
from runledger.streams.producer.epoch import EPOCH_LUA, HeadsRecovering, RedisLock, epoch_key, read_epoch, run_id
from runledger.streams.producer.heads import parse_head
from runledger.streams.producer.logread import LogTimedOut, read_log
from runledger.streams.settings import Settings

__all__ = ["Recovered", "log_chains", "recover_heads", "stream_in_log"]

_LOCK_MS = 10_000  # the recoverer renews its lock every third of this; a recoverer that dies holds others this long

# KEYS: head. ARGV: the head it was followed from (seq, hash), the new seq, hash, type. A head only moves forward,
# and only from the head the log was followed from (anything else moved it meanwhile: follow again).
_FORWARD = """
if (redis.call('HGET', KEYS[1], 'seq') or '0') ~= ARGV[1] then return 0 end
if (redis.call('HGET', KEYS[1], 'hash') or ARGV[6]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'seq', ARGV[3], 'hash', ARGV[4], 'type', ARGV[5])
return 1
"""

# KEYS: epoch, lock. ARGV: lock token, then partition/offset pairs: what the recoverer holding the lock has read.
_PROGRESS = EPOCH_LUA + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
forward_checkpoints(KEYS[1], 2)
return 1
"""

# KEYS: epoch, lock. ARGV: lock token, the Redis run id the recovery started in, a new epoch token. The heads are
# complete in this run, if Redis neither restarted (run id) nor lost its data (the lock) since the recovery began.
_MARK = EPOCH_LUA + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] or run_id() ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'run_id', ARGV[2], 'token', ARGV[3])
return 1
"""


@dataclass(slots=True)
class Recovered:
    """What a recovery read and did: the offsets it read each partition from and to, the log records it read,
    the streams it saw events of, and the heads it moved forward."""

    starts: dict[int, int] = field(default_factory=dict)
    ends: dict[int, int] = field(default_factory=dict)
    streams: set[str] = field(default_factory=set)
    moved: set[str] = field(default_factory=set)

    @property
    def records(self) -> int:
        return sum(end - self.starts.get(p, 0) for p, end in self.ends.items())


class _Recovery:
    """Moves heads forward slice by slice of the log, and checkpoints what it has read."""

    def __init__(self, redis: Redis, prefix: str, lock: RedisLock, done: Recovered) -> None:
        self._redis, self._prefix, self._lock, self.done = redis, prefix, lock, done
        self._forward = redis.register_script(_FORWARD)
        self._progress = redis.register_script(_PROGRESS)
        self._waiting: dict[str, list[LoggedEvent]] = {}  # events that came before their predecessor

    async def slice(self, events: list[LoggedEvent], read_to: dict[int, int]) -> None:
        pending = list(by_stream(events).items())
        self.done.streams.update(stream for stream, _ in pending)
        while pending:  # again for a head that moved meanwhile (an append's commit from before the loss)
            pipe = self._redis.pipeline(transaction=False)
            for stream, _ in pending:
                pipe.hgetall(f"{self._prefix}:head:{stream}")
            moves = []
            for (stream, found), raw in zip(pending, await pipe.execute(), strict=True):
                head, last_type = parse_head(raw)
                chain = Chain(head, last_type, waiting=list(self._waiting.get(stream, ())))
                chain.extend(found)
                if chain.head != head:
                    moves.append((stream, found, head, chain))
                else:
                    self._wait(stream, chain)
            pipe = self._redis.pipeline(transaction=False)
            for stream, _, head, chain in moves:
                await self._forward(keys=[f"{self._prefix}:head:{stream}"], client=pipe, args=[
                    head.seq, head.hash, chain.head.seq, chain.head.hash, chain.type or "", GENESIS_HASH])
            pending = []
            for (stream, found, _, chain), moved in zip(moves, await pipe.execute() if moves else [], strict=True):
                if not moved:
                    pending.append((stream, found))
                    continue
                self.done.moved.add(stream)
                self._wait(stream, chain)
        self.done.ends = read_to
        pairs = [x for partition, offset in sorted(read_to.items()) for x in (partition, offset)]
        if not await self._progress(keys=[epoch_key(self._prefix), self._lock.key], args=[self._lock.token, *pairs]):
            raise HeadsRecovering("the recovery lock was lost (Redis restarted or lost its data, or this process "
                                  "stalled past it): another recovery takes over")

    def _wait(self, stream: str, chain: Chain) -> None:
        if chain.waiting:
            self._waiting[stream] = chain.waiting
        else:
            self._waiting.pop(stream, None)


async def recover_heads(redis: Redis, settings: Settings, *, deadline: float | None = None,
                        full: bool = False, force: bool = False) -> Recovered | None:
    """Recover the heads from the log if the epoch is not current (with ``force``, even if it is), and mark it
    current. None: the epoch was current, or another producer recovered meanwhile.

    ``deadline`` (``time.monotonic()``): raise HeadsRecovering past it, waiting for another recoverer or reading
    the log (what was read is checkpointed: the next recovery goes on from there). ``full``: read the log from
    offset 0, not from the checkpoints."""
    prefix = settings.topic_prefix
    lock = RedisLock(redis, f"{prefix}:heads:recovering", _LOCK_MS)
    while not await lock.acquire():
        if not force and (await read_epoch(redis, prefix)).current:
            return None
        if deadline is not None and time.monotonic() >= deadline:
            raise HeadsRecovering(f"Redis lost its chain heads and another producer is recovering them from the log; "
                                  f"it did not finish within RUNLEDGER_PRODUCER_WAIT_S ({settings.producer_wait_s} s)")
        await asyncio.sleep(0.2)
    async with lock.renewed():
        epoch = await read_epoch(redis, prefix)
        if epoch.current and not force:
            return None
        started_in = await run_id(redis)
        done = Recovered(starts={} if full else dict(epoch.checkpoints))
        recovery = _Recovery(redis, prefix, lock, done)
        try:
            ends = await read_log(settings, done.starts, recovery.slice, deadline=deadline)
            if not epoch.current and any(ends.values()):
                # An append that was publishing when Redis lost its data lost its staged batch with it, and its
                # commit now fails; the lease is how long a publish may take, so after it that append's events
                # are in the log, where reading on finds them.
                await asyncio.sleep(settings.producer_lease_ms / 1000)
                await read_log(settings, ends, recovery.slice,
                               deadline=None if deadline is None else max(deadline, time.monotonic() + 1))
        except LogTimedOut as e:
            raise HeadsRecovering(f"Redis lost its chain heads; recovering them from the log did not finish within "
                                  f"RUNLEDGER_PRODUCER_WAIT_S ({settings.producer_wait_s} s): {e}") from e
        if not await redis.register_script(_MARK)(keys=[epoch_key(prefix), lock.key],
                                                  args=[lock.token, started_in, uuid.uuid4().hex]):
            raise HeadsRecovering("Redis restarted or lost its data during the recovery of its chain heads: they are "
                                  "recovered again")
        return done


async def log_chains(settings: Settings, only: set[str] | None = None) -> tuple[dict[str, Chain], dict[int, int]]:
    """Every stream's chain (of ``only`` these) as the log has it, each partition read from its start, and where
    each partition was read to."""
    chains: dict[str, Chain] = {}

    async def follow(events: list[LoggedEvent], _: dict[int, int]) -> None:
        for stream, found in by_stream(events).items():
            chains.setdefault(stream, Chain()).extend(found)

    ends = await read_log(settings, {}, follow, only=only)
    return chains, ends


async def stream_in_log(settings: Settings, stream_id: str) -> set[tuple[int, str]]:
    """(seq, hash) of every valid event of ``stream_id`` in the log (all partitions read: it may span several)."""
    found: set[tuple[int, str]] = set()

    async def take(events: list[LoggedEvent], _: dict[int, int]) -> None:
        found.update((e.seq, e.hash) for e in events)

    await read_log(settings, {}, take, only={stream_id})
    return found
