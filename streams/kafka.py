"""What every Kafka client of runledger needs beyond aiokafka's own API: its connection options (TLS and SASL
as the settings say), a consumer stop that always ends, and a read of partitions to their true end."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

from runledger.schemas.errors import TransientError
from runledger.streams.settings import SecretMissing, Settings

__all__ = ["client_options", "read_to_end", "stop_consumer"]

log = logging.getLogger(__name__)

_GRACES = 6  # grace periods before giving up on a stop


def client_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments every aiokafka client of runledger (producer, consumer, admin) is made with: the
    bootstrap servers, TLS with RUNLEDGER_KAFKA_TLS, and SASL (SCRAM-SHA-512 by default) as
    RUNLEDGER_KAFKA_SASL_USERNAME with the password of RUNLEDGER_KAFKA_SASL_PASSWORD_FILE. Raises SecretMissing
    if a SASL user has no password."""
    options: dict[str, Any] = {"bootstrap_servers": settings.kafka_bootstrap_servers}
    if settings.kafka_tls:
        cafile = str(settings.kafka_tls_cafile) if settings.kafka_tls_cafile is not None else None
        options |= {"security_protocol": "SSL", "ssl_context": create_ssl_context(cafile=cafile)}
    if settings.kafka_sasl_username is not None:
        password = settings.secret("kafka_sasl_password_file")
        if password is None:
            raise SecretMissing(f"Kafka user {settings.kafka_sasl_username} has no password: set "
                                "RUNLEDGER_KAFKA_SASL_PASSWORD_FILE")
        options |= {"security_protocol": "SASL_SSL" if settings.kafka_tls else "SASL_PLAINTEXT",
                    "sasl_mechanism": settings.kafka_sasl_mechanism,
                    "sasl_plain_username": settings.kafka_sasl_username,
                    "sasl_plain_password": password.get_secret_value()}
    return options


async def stop_consumer(consumer: AIOKafkaConsumer, *, grace_s: float = 5.0) -> None:
    """``consumer.stop()``, made sure to end.

    aiokafka 0.14's fetch routine swallows the cancellation that stops it when it arrives while the routine
    waits for the fetches it cancelled after an assignment change (``contextlib.suppress(CancelledError)``
    in ``Fetcher._fetch_requests_routine``), and ``stop()`` then waits for it for ever. Cancelled once more,
    the routine ends. If it still has not stopped after six grace periods, it logs an error and returns rather
    than wait for ever.
    """
    stopping = asyncio.ensure_future(consumer.stop())
    for _ in range(_GRACES):
        if (await asyncio.wait({stopping}, timeout=grace_s))[0]:
            stopping.result()
            return
        routine = getattr(getattr(consumer, "_fetcher", None), "_fetch_task", None)
        if isinstance(routine, asyncio.Task) and not routine.done():
            log.warning("the Kafka consumer did not stop within %.0f s: cancelling its fetch routine again", grace_s)
            routine.cancel()
    stopping.cancel()
    # Not raised: callers stop consumers in finally blocks, whose other cleanup must still run.
    log.error("the Kafka consumer did not stop within %.0f s; its connections are left to close with the process",
              _GRACES * grace_s)


async def read_to_end(consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition],
                      take: Callable[[TopicPartition, list[Any]], None], *, stalled_s: float = 60.0,
                      max_records: int = 10_000,
                      progress: Callable[[dict[TopicPartition, int]], None] | None = None,
                      until: Mapping[TopicPartition, int] | None = None) -> dict[TopicPartition, int]:
    """Read ``tps`` (assigned to ``consumer`` and sought to where to read from: ``seek``, not a lazy
    ``seek_to_beginning``, which an offset reset already under way can override) up to where each ends when the
    read starts, handing each fetched list of records to ``take``; returns those ends. ``progress`` is called
    after each fetch with the ends known so far.

    A partition's end is the high watermark of its first fetch response, not the end offset of a ListOffsets
    request: the embedded broker (Tansu 0.6) reports that as the first offset of the partition's most recently
    written batch plus one, so the rest of that batch would go unread. Nor is the end found by waiting until
    fetches come back empty: under load a fetch can come back empty before the end. One exception: Tansu moves
    a partition's high watermark before it writes the batch, so a broker killed in between leaves offsets that
    will never hold a record (until the next write past them). A partition whose fetches come back empty for
    ``_HOLE_S`` while it is read past the start of its most recently written batch has nothing more: its end is
    where it is read to, and a warning says so. Raises TransientError if partitions send nothing for
    ``stalled_s`` before their end. ``until``: read a partition named there no further than that offset (its end
    is the lower of the two; the consumer's position may then be past it).
    """
    ends: dict[TopicPartition, int] = {}
    progressed = time.monotonic()
    while behind := [tp for tp in tps if tp not in ends or await consumer.position(tp) < ends[tp]]:
        fetched = await consumer.getmany(*behind, timeout_ms=1000, max_records=max_records)
        idle = time.monotonic() - progressed
        if fetched:
            progressed = time.monotonic()
        elif idle > _HOLE_S and all(tp in ends for tp in behind) and await _holes(consumer, behind, ends):
            progressed = time.monotonic()
            continue
        elif idle > stalled_s:
            raise TransientError(f"partitions {sorted(tp.partition for tp in behind)} of {behind[0].topic} sent "
                                 f"nothing for {stalled_s:.0f} s before their end: is their leader down? Try again")
        for tp in behind:
            if tp not in ends and (highwater := consumer.highwater(tp)) is not None:
                ends[tp] = min(highwater, until[tp]) if until is not None and tp in until else highwater
        for tp, messages in fetched.items():
            if messages[-1].offset >= ends[tp]:  # appended since the read started
                messages = [m for m in messages if m.offset < ends[tp]]
            if messages:
                take(tp, messages)
        if progress is not None:
            progress(ends)
    return ends


_HOLE_S = 5.0


async def _holes(consumer: AIOKafkaConsumer, behind: list[TopicPartition], ends: dict[TopicPartition, int]) -> bool:
    """End the partitions of ``behind`` read past the start of their most recently written batch (what Tansu
    reports as the end offset): the offsets left up to their high watermark hold no record. True if any."""
    try:
        async with asyncio.timeout(10):
            latest = await consumer.end_offsets(behind)
    except (KafkaError, TimeoutError) as e:
        log.debug("the end offsets, to tell a hole from a stall: %s", e)
        return False
    found = False
    for tp in behind:
        position = await consumer.position(tp)
        if position >= latest[tp]:
            log.warning("%s partition %d: offsets %d..%d hold no record (the broker stopped between moving its high "
                        "watermark and writing the batch); read to %d", tp.topic, tp.partition, position,
                        ends[tp] - 1, position)
            ends[tp], found = position, True
    return found
