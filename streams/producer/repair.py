"""``runledger heads repair``: put a head that is not on the log's first branch back onto it.

A head in Redis can sit on a branch that workers do not follow: a fork in the log (two events at one seq) that
an older recovery, which chose between them by hash order, followed to the wrong one, or a head copied in from
elsewhere. Appends would then extend a branch that every worker dead-letters. Recovery only moves heads forward
(``runledger.streams.producer.recovery``); repair reads the whole log, follows each stream as a worker does
(``runledger.streams.producer.chains``), and, under the stream's append lease, moves the head to the first
branch's end: back, if it was on another branch, dropping a batch staged on that branch and the idempotency keys
of that branch's events (a retry then appends again, on the first branch); forward, if it was behind on the first
branch with nothing staged.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import cast

import orjson
from redis.asyncio import Redis

from runledger.schemas.chain import Head
from runledger.schemas.errors import PermanentError, TransientError
from runledger.schemas.events import validate_stream_id
from runledger.streams.producer.chains import Chain, LoggedEvent
from runledger.streams.producer.epoch import redis_errors
from runledger.streams.producer.heads import StreamHeads, parse_head
from runledger.streams.producer.logread import read_log
from runledger.streams.producer.recovery import log_chains
from runledger.streams.settings import Settings

__all__ = ["NotInLog", "Repaired", "repair_heads"]


class NotInLog(PermanentError):
    """The stream named has no valid event in the log, so there is no branch to move its head to. Check the
    stream id (and ``RUNLEDGER_TOPIC_PREFIX``)."""

    code = "not_in_log"


@dataclass(frozen=True, slots=True)
class Repaired:
    """A head moved: from ``before`` (Redis's) to ``after`` (the end of the log's first branch); ``back`` if it
    was on another branch; the seqs of a batch staged on that branch, dropped; idempotency keys forgotten."""

    stream: str
    before: Head
    after: Head
    back: bool
    dropped: tuple[int, int] | None
    forgotten: int


# KEYS: head, pending, idempotency, lease, staged. ARGV: lease token, the head as read (seq, hash), the new head
# (seq, hash, type; seq 0: none), the staged batch to drop ('' for none), stream id, idempotency keys to forget...
_REPAIR = """
if redis.call('GET', KEYS[4]) ~= ARGV[1] then return 0 end
if (redis.call('HGET', KEYS[1], 'seq') or '0') ~= ARGV[2] or (redis.call('HGET', KEYS[1], 'hash') or '') ~= ARGV[3] then
  return 0
end
if ARGV[4] == '0' then redis.call('DEL', KEYS[1]) else
  redis.call('HSET', KEYS[1], 'seq', ARGV[4], 'hash', ARGV[5], 'type', ARGV[6])
end
if ARGV[7] ~= '' and redis.call('HGET', KEYS[2], 'batch') == ARGV[7] then
  redis.call('DEL', KEYS[2])
  redis.call('SREM', KEYS[5], ARGV[8])
end
for i = 9, #ARGV do redis.call('HDEL', KEYS[3], ARGV[i]) end
return 1
"""


async def repair_heads(settings: Settings, stream: str | None = None) -> list[Repaired]:
    """Move each head (of ``stream`` only, if named) that is not at the end of the log's first branch there; the
    heads moved. Raises NotInLog, StreamBusy (an append held the stream's lease past RUNLEDGER_PRODUCER_WAIT_S),
    or a TransientError (Redis or the log could not be read, or a head moved under the repair: run it again)."""
    if stream is not None:
        validate_stream_id(stream)
    chains, ends = await log_chains(settings, None if stream is None else {stream})
    if stream is not None and stream not in chains:
        raise NotInLog(f"stream {stream!r} has no valid event in {settings.events_topic}: there is no branch to "
                       "move its head to")
    redis = Redis.from_url(settings.redis_dsn)
    try:
        with redis_errors("heads repair"):
            names = sorted(chains)
            pipe = redis.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(f"{settings.topic_prefix}:head:{name}")
            raws = await pipe.execute() if names else []
            out = []
            for name, raw in zip(names, raws, strict=True):
                if parse_head(raw)[0] != chains[name].head:
                    repaired = await _repair(redis, settings, name, chains[name], ends)
                    if repaired is not None:
                        out.append(repaired)
            return out
    finally:
        await redis.aclose()


async def _repair(redis: Redis, settings: Settings, stream: str, chain: Chain, ends: dict[int, int]) -> Repaired | None:
    prefix = settings.topic_prefix
    heads = StreamHeads(redis, prefix, settings.producer_lease_ms)
    token = uuid.uuid4().hex
    await heads.acquire(stream, token, settings.producer_wait_s)
    try:
        async def follow(events: list[LoggedEvent], _: dict[int, int]) -> None:
            chain.extend(events)

        await read_log(settings, ends, follow, only={stream})  # what was appended since the log was read
        state = await heads.read(stream, [])
        before, staged = state.head, state.left_behind
        on_branch = before.seq == 0 or chain.branch.get(before.seq) == before.hash
        if before == chain.head or (on_branch and staged is not None):
            return None  # at the end already, or behind it with a batch staged that the sweeper rolls forward
        forget: list[str] = []
        if not on_branch:
            for key, ref in cast("dict[bytes, bytes]", await redis.hgetall(f"{prefix}:idem:{stream}")).items():
                seq, _, hash_ = orjson.loads(ref)
                if chain.branch.get(seq) != hash_:
                    forget.append(key.decode())
        drop = staged if staged is not None and not on_branch else None
        done = await redis.register_script(_REPAIR)(
            keys=[f"{prefix}:{kind}:{stream}" for kind in ("head", "pending", "idem", "lease")] + [f"{prefix}:staged"],
            args=[token, before.seq, before.hash if before.seq else "", chain.head.seq, chain.head.hash,
                  chain.type or "", drop.batch_id if drop is not None else "", stream, *forget])
        if not done:
            raise TransientError(f"stream {stream!r}: its head moved during the repair (the lease lapsed); run it "
                                 "again")
        return Repaired(stream, before, chain.head, not on_branch,
                        (drop.refs[0].seq, drop.refs[-1].seq) if drop is not None else None, len(forget))
    finally:
        await heads.release(stream, token)
