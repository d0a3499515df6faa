"""A producer's stop ends even when its sweeper's round swallows the cancellation (as aiokafka can while it
starts a consumer against a broker that is down): no services, the producer is never started."""

from __future__ import annotations

import asyncio

import pytest

from runledger.streams.producer import client
from runledger.streams.producer.client import EventProducer
from runledger.streams.settings import Settings


async def test_stop_ends_even_if_the_sweeper_swallows_its_cancellation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "_SWEEPER_GRACE_S", 0.1, raising=False)
    producer = EventProducer(Settings())

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:  # swallowed once
            await asyncio.sleep(3600)

    producer._sweeper = asyncio.create_task(stubborn())  # noqa: SLF001
    await asyncio.sleep(0)
    stop = asyncio.create_task(producer.stop())
    done, _ = await asyncio.wait({stop}, timeout=5)
    assert done, "the producer's stop still waits on its sweeper"
    assert producer._sweeper.done()  # noqa: SLF001
