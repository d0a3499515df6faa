"""Chain heads that cannot fork: recovering Redis's heads from the log.

Redis holds every stream's head while the marker ``<prefix>:heads:complete``
exists: it is written only after a complete recovery (or on first use), and a
``FLUSHALL`` or a restart without data removes it with the heads. A producer
that finds a head missing and the marker gone does not start the stream at seq
1: it recovers every head first. The log is the truth: every partition is read
from its start, and each stream's chain is followed from seq 1 (hash and link
checked) to its last event; a head in Redis is only ever moved forward.
``runledger heads recover`` recovers on demand; ``runledger heads check``
(``runledger.streams.tools.heads``) compares Redis, the log and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from redis.asyncio import Redis

from runledger.schemas.chain import GENESIS_HASH, compute_hash
from runledger.schemas.errors import PermanentError, TransientError
from runledger.schemas.events import decode_json
from runledger.streams.kafka import client_options, read_to_end, stop_consumer
from runledger.streams.settings import Settings

__all__ = ["LogHead", "forget_if_restarted", "log_heads", "marker_key", "recover_heads", "stream_in_log"]

_LOCK_MS = 120_000

# KEYS: head. ARGV: seq, hash, type. A head only moves forward.
_FORWARD = """
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1')
if seq >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'hash', ARGV[2], 'type', ARGV[3])
return 1
"""


@dataclass(slots=True)
class LogHead:
    """A stream's last event in the log, following its chain from seq 1; ``forks``: seqs held by another event."""

    seq: int = 0
    hash: str = GENESIS_HASH
    type: str = ""
    forks: list[int] = field(default_factory=list)


def marker_key(prefix: str) -> str:
    """The Redis key that says its heads are complete (see above)."""
    return f"{prefix}:heads:complete"


async def log_heads(settings: Settings) -> dict[str, LogHead]:
    """Every stream's head as the log has it: each partition read from its start, each chain followed."""
    return {stream: _follow(found) for stream, found in (await _scan(settings)).items()}


async def _scan(settings: Settings, only: set[str] | None = None) -> dict[str, list[tuple[int, str, str, str]]]:
    """stream -> (seq, prevhash, hash, type) of each valid event in the log (of ``only`` these streams)."""
    # "earliest": the reset that assign() starts must not put a partition at its end meanwhile.
    consumer = AIOKafkaConsumer(**client_options(settings), group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                max_partition_fetch_bytes=2 * 1024 * 1024)
    events: dict[str, list[tuple[int, str, str, str]]] = {}
    keys = {s.encode() for s in only} if only is not None else None
    try:
        await consumer.start()
        partitions: set[int] = set()
        for _ in range(10):  # metadata may lag behind a topic created a moment ago
            await consumer._client.force_metadata_update()  # noqa: SLF001
            partitions = consumer.partitions_for_topic(settings.events_topic) or set()
            if partitions:
                break
            await asyncio.sleep(0.2)
        tps = [TopicPartition(settings.events_topic, p) for p in sorted(partitions)]
        if not tps:
            return events
        consumer.assign(tps)
        starts = await consumer.beginning_offsets(tps)
        if any(starts.values()):
            raise TransientError(f"{settings.events_topic} no longer starts at offset 0 (retention): the heads "
                                 "cannot be proven from it")
        for tp in tps:  # at once, not a lazy seek_to_beginning that the reset under way can override
            consumer.seek(tp, 0)

        def take(tp: TopicPartition, messages: list[Any]) -> None:
            for m in messages:
                if keys is None or m.key in keys:
                    _collect(events, m.value or b"")

        await read_to_end(consumer, tps, take)
    except KafkaError as e:
        raise TransientError(f"cannot read {settings.events_topic}: {e}") from e
    finally:
        await stop_consumer(consumer)
    return events


def _collect(events: dict[str, list[tuple[int, str, str, str]]], value: bytes) -> None:
    """Keep a record that is an event whose hash is right; a stream's events may come from several partitions."""
    try:
        event = decode_json(value)  # not I-JSON (two members of one name): not an event either
        subject, seq, prevhash, claimed = event["subject"], event["seq"], event["prevhash"], event["hash"]
        valid = isinstance(subject, str) and isinstance(seq, int) and compute_hash(event) == claimed
    except (PermanentError, KeyError, TypeError, ValueError, RecursionError):
        return  # not an event: it never was a head
    if valid:
        events.setdefault(subject, []).append((seq, prevhash, claimed, str(event.get("type", ""))))


def _follow(found: list[tuple[int, str, str, str]]) -> LogHead:
    """The chain's end, from seq 1, in seq order; a second event at a seq already taken is a fork."""
    head = LogHead()
    for seq, prevhash, claimed, event_type in sorted(found):
        if seq == head.seq and claimed != head.hash:
            if seq not in head.forks:
                head.forks.append(seq)
        elif seq == head.seq + 1 and prevhash == head.hash:
            head.seq, head.hash, head.type = seq, claimed, event_type
    return head


async def stream_in_log(settings: Settings, stream_id: str) -> dict[int, str]:
    """seq -> hash of the events of ``stream_id`` in the log (all partitions read: it may span several)."""
    return {seq: claimed for seq, _, claimed, _ in (await _scan(settings, {stream_id})).get(stream_id, [])}


async def recover_heads(redis: Redis, settings: Settings) -> tuple[int, int]:
    """Move every head in Redis forward to the log's, then mark Redis complete. Returns (streams in the log,
    heads moved). One recovery at a time; others wait for it."""
    lock, token = f"{settings.topic_prefix}:heads:recovering", uuid.uuid4().hex
    while not await redis.set(lock, token, nx=True, px=_LOCK_MS):
        await asyncio.sleep(0.2)
        if await redis.exists(marker_key(settings.topic_prefix)):
            return 0, 0  # another producer recovered meanwhile
    try:
        heads = await log_heads(settings)
        if heads:  # a log in use (not a first start):
            # an append that was publishing when Redis lost its data lost its lease with it; the lease is how
            # long a publish may take, so after it that append's events are in the log, where a scan finds them.
            await asyncio.sleep(settings.producer_lease_ms / 1000)
            heads = await log_heads(settings)
        forward = redis.register_script(_FORWARD)
        moved = 0
        for stream, head in heads.items():
            moved += await forward(keys=[f"{settings.topic_prefix}:head:{stream}"],
                                   args=[head.seq, head.hash, head.type])
        await redis.set(marker_key(settings.topic_prefix), orjson.dumps(
            {"streams": len(heads), "moved": moved, "run_id": await _run_id(redis)}))
        return len(heads), moved
    finally:
        with contextlib.suppress(Exception):
            if await redis.get(lock) == token.encode():
                await redis.delete(lock)


async def _run_id(redis: Redis) -> str:
    return str((await redis.info("server")).get("run_id", ""))


async def forget_if_restarted(redis: Redis, prefix: str) -> None:
    """Drop the complete mark if Redis restarted since it was written: a restart may have lost the last
    writes (the append-only file is synced once a second, a replica may lag), so the heads are proven again."""
    mark = await redis.get(marker_key(prefix))
    if mark is not None and orjson.loads(mark).get("run_id") != await _run_id(redis):
        await redis.delete(marker_key(prefix))
