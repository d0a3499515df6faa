"""The sweeper: one producer or worker at a time publishes batches left staged, and moves the heads' checkpoints.

Every producer (and so every worker) runs ``Sweeper.run``, but only the one that holds the lock
``<prefix>:heads:sweeper`` sweeps: it renews the lock every ``RUNLEDGER_PRODUCER_SWEEP_S``, and it lapses after
three of those, when another takes over. Each round it publishes the batches staged by producers that failed or
died (the streams in ``<prefix>:staged``, no keyspace scan), then moves the heads' checkpoints
(``runledger.streams.producer.epoch``) forward without reading the log:

A round notes where each partition ends now, then the batches staged now. An event below such an end was
staged before it was published, so before the end was noted: by the next round, if the batches noted are no
longer staged (committed, rolled forward or refused), every event below those ends is in the heads. A partition
that holds a batch still staged keeps its checkpoint until that batch is settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from runledger.schemas.errors import TransientError
from runledger.streams.kafka import client_options, stop_consumer
from runledger.streams.producer.epoch import RedisLock, advance_checkpoints, read_epoch
from runledger.streams.producer.logread import end_offsets, partition_of
from runledger.streams.settings import Settings

__all__ = ["Sweeper"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Noted:
    """A round's note: the epoch's token, where each partition ended, and the batches staged just after."""

    token: str
    ends: dict[int, int]
    staged: dict[str, bytes]


class Sweeper:
    """Sweeps (``sweep``: publish what is left staged) when elected; see the module docstring."""

    def __init__(self, redis: Redis, settings: Settings, sweep: Callable[[], Awaitable[object]]) -> None:
        self._redis, self._settings, self._sweep = redis, settings, sweep
        self._lock = RedisLock(redis, f"{settings.topic_prefix}:heads:sweeper",
                               max(1000, int(settings.producer_sweep_s * 3000)))
        self._consumer: AIOKafkaConsumer | None = None  # for the partitions' ends, once elected
        self._noted: _Noted | None = None

    async def run(self) -> None:
        """Every ``RUNLEDGER_PRODUCER_SWEEP_S``: a round if elected. Failures are logged, never raised."""
        try:
            while True:
                await asyncio.sleep(self._settings.producer_sweep_s)
                try:
                    await self.round()
                except (TransientError, RedisError, KafkaError) as e:
                    log.warning("sweeping staged batches: %s", e)
                except Exception:  # noqa: BLE001 - a bug here must not end the rounds of every later one
                    log.exception("a sweeper round failed; trying again at the next")
        finally:
            if self._consumer is not None:
                await stop_consumer(self._consumer)
            with contextlib.suppress(RedisError):
                await self._lock.release()

    async def round(self) -> bool:
        """Sweep and move the checkpoints if elected (True), else nothing (False)."""
        if not await self._lock.hold():
            self._noted = None
            return False
        await self._sweep()
        await self._checkpoint()
        return True

    async def _checkpoint(self) -> None:
        prefix = self._settings.topic_prefix
        epoch = await read_epoch(self._redis, prefix)
        noted, self._noted = self._noted, None
        if not epoch.current or epoch.token is None:
            return  # the heads are being recovered: the recovery checkpoints
        if noted is not None and noted.token == epoch.token:
            pipe = self._redis.pipeline(transaction=False)
            for stream in noted.staged:
                pipe.hget(f"{prefix}:pending:{stream}", "batch")
            still = [s for s, batch in zip(noted.staged, await pipe.execute(), strict=True)
                     if batch == noted.staged[s]]
            held = {partition_of(s, len(noted.ends)) for s in still}
            await advance_checkpoints(self._redis, prefix, noted.token,
                                      {p: end for p, end in noted.ends.items() if p not in held})
        ends = await self._ends()  # first the ends, then what is staged: see the module docstring
        staged = [s.decode() for s in cast("set[bytes]", await self._redis.smembers(f"{prefix}:staged"))]
        pipe = self._redis.pipeline(transaction=False)
        for stream in staged:
            pipe.hget(f"{prefix}:pending:{stream}", "batch")
        batches = await pipe.execute()
        self._noted = _Noted(epoch.token, ends,
                             {s: b for s, b in zip(staged, batches, strict=True) if b is not None})

    async def _ends(self) -> dict[int, int]:
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(**client_options(self._settings), group_id=None,
                                              enable_auto_commit=False)
            try:
                await self._consumer.start()
            except KafkaError:
                consumer, self._consumer = self._consumer, None
                await stop_consumer(consumer)
                raise
        return await end_offsets(self._consumer, self._settings.events_topic)
