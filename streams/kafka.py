"""What every Kafka client of runledger needs beyond aiokafka's own API: a consumer stop that always ends."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer

__all__ = ["stop_consumer"]

log = logging.getLogger(__name__)

_GRACES = 6  # grace periods before giving up on a stop


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
