"""Reading the log for the heads: each partition from an offset to its end, in slices, within a deadline; where
each partition ends now; which partition a producer puts a stream on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from runledger.schemas.errors import TransientError
from runledger.streams.kafka import client_options, read_to_end, stop_consumer
from runledger.streams.producer.chains import LoggedEvent, logged
from runledger.streams.settings import Settings

__all__ = ["LogTimedOut", "Slice", "end_offsets", "partition_of", "read_log", "topic_partitions"]

Slice = Callable[[list[LoggedEvent], dict[int, int]], Awaitable[None]]

_SLICE = 20_000  # records of a partition read before they are handed on


class LogTimedOut(TransientError):
    """The log could not be read to its end before the deadline; what was read was handed on."""

    code = "log_timed_out"


def partition_of(stream_id: str, partitions: int) -> int:
    """The partition a producer puts ``stream_id`` on: murmur2, as Java's and aiokafka's default (SPEC.md 1)."""
    return int(murmur2(stream_id.encode()) & 0x7FFFFFFF) % partitions


def _consumer(settings: Settings) -> AIOKafkaConsumer:
    # "earliest": the reset that assign() starts must not put a partition at its end meanwhile.
    return AIOKafkaConsumer(**client_options(settings), group_id=None,
                            enable_auto_commit=False, auto_offset_reset="earliest",
                            max_partition_fetch_bytes=2 * 1024 * 1024)


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """``topic``'s partitions; metadata may lag behind a topic created a moment ago."""
    for _ in range(10):
        await consumer._client.force_metadata_update()  # noqa: SLF001
        partitions = consumer.partitions_for_topic(topic) or set()
        if partitions:
            return [TopicPartition(topic, p) for p in sorted(partitions)]
        await asyncio.sleep(0.2)
    return []


async def end_offsets(consumer: AIOKafkaConsumer, topic: str) -> dict[int, int]:
    """Where each partition of ``topic`` ends now, as the broker reports it (Tansu: at most that: see
    ``read_to_end``): every record below was written before the call."""
    tps = await topic_partitions(consumer, topic)
    return {tp.partition: offset for tp, offset in (await consumer.end_offsets(tps)).items()} if tps else {}


async def read_log(settings: Settings, starts: Mapping[int, int], on_slice: Slice, *, only: set[str] | None = None,
                   deadline: float | None = None) -> dict[int, int]:
    """Read every partition of the log from ``starts`` (partition -> offset; 0 where missing) to where it ends,
    handing each slice of valid events (of ``only`` these streams), with the offsets read to, to ``on_slice``.
    Returns where each partition was read to.

    Past ``deadline`` (``time.monotonic()``), what was read is handed on and LogTimedOut raised. A partition that
    no longer holds its records from where it is to be read (retention) raises TransientError: what it held there
    cannot be proven."""
    consumer = _consumer(settings)
    keys = {s.encode() for s in only} if only is not None else None
    try:
        await consumer.start()
        tps = await topic_partitions(consumer, settings.events_topic)
        if not tps:
            return {}
        consumer.assign(tps)
        positions = {tp.partition: starts.get(tp.partition, 0) for tp in tps}
        for tp, first in (await consumer.beginning_offsets(tps)).items():
            if first > positions[tp.partition]:
                raise TransientError(f"{settings.events_topic} partition {tp.partition} starts at offset {first}, "
                                     f"no longer at {positions[tp.partition]} (retention): the heads cannot be "
                                     "proven from it")
        found: list[LoggedEvent] = []

        def take(tp: TopicPartition, messages: list[Any]) -> None:
            for m in messages:
                positions[tp.partition] = m.offset + 1
                if (keys is None or m.key in keys) and (event := logged(m.value or b"", m.partition, m.offset)):
                    found.append(event)

        while True:
            for tp in tps:  # at once, not a lazy seek that the reset under way can override
                consumer.seek(tp, positions[tp.partition])
            until = {tp: positions[tp.partition] + _SLICE for tp in tps}
            found.clear()
            try:
                async with asyncio.timeout_at(None if deadline is None else _loop_time(deadline)):
                    ends = await read_to_end(consumer, tps, take, until=until)
            except TimeoutError:
                await on_slice(list(found), dict(positions))
                raise LogTimedOut(f"{settings.events_topic} could not be read to its end in time; read to "
                                  f"{dict(sorted(positions.items()))}") from None
            positions.update({tp.partition: end for tp, end in ends.items()})
            await on_slice(list(found), dict(positions))
            if all(ends[tp] < until[tp] for tp in tps):
                return positions
    except KafkaError as e:
        raise TransientError(f"cannot read {settings.events_topic}: {e}") from e
    finally:
        await stop_consumer(consumer)


def _loop_time(deadline: float) -> float:
    """``deadline`` on ``time.monotonic()``'s clock, on the event loop's clock."""
    return asyncio.get_running_loop().time() + deadline - time.monotonic()
