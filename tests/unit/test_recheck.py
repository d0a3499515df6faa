"""The log consumer checks the partitions it holds back again beside its loop, less and less often: no services
(the checks themselves are counted, not made; 5 s and 60 s become 0.1 s and 0.8 s)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition

from runledger.streams.worker import consumer
from runledger.streams.worker.consumer import LogConsumer


class _Counted(LogConsumer):
    """A log consumer that holds partitions 0 and 1, and notes when it checks which."""

    assigned = frozenset({0, 1})  # in place of the group's assignment

    def __init__(self) -> None:
        super().__init__({"bootstrap_servers": "127.0.0.1:9"}, "log", "group", store=None, pool=None, project=None)  # type: ignore[arg-type]
        self.checks: list[tuple[float, list[int]]] = []

    async def close(self) -> None:
        for kafka in (self._consumer, self._checker):  # never started: nothing to wait for
            await kafka.stop()

    async def _check(self, tps: list[TopicPartition], **_: Any) -> None:
        self.checks.append((asyncio.get_running_loop().time(), [tp.partition for tp in tps]))


async def test_held_partitions_are_checked_again_less_and_less_often(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer, "_RECHECK_S", 0.1)
    monkeypatch.setattr(consumer, "_RECHECK_MAX_S", 0.8)
    counted = _Counted()
    counted._hold(0, "the log ends before the stored offset")
    started = asyncio.get_running_loop().time()
    rechecks = asyncio.create_task(counted._recheck_held())
    try:
        async with asyncio.timeout(10):
            while len(counted.checks) < 4:
                await asyncio.sleep(0.01)
        # 0.1, 0.3, 0.7, 1.5 s: doubling (at a constant 0.1 s, the fourth would come at 0.4 s)
        assert counted.checks[3][0] - started >= 1.2, counted.checks
        assert all(partitions == [0] for _, partitions in counted.checks)
        # at most every 0.8 s from now on; a partition newly held is checked again soon all the same
        counted._hold(1, "the log does not begin at offset 0")
        held_at = asyncio.get_running_loop().time()
        async with asyncio.timeout(10):
            while len(counted.checks) < 5:
                await asyncio.sleep(0.01)
        assert counted.checks[4][0] - held_at < 0.5 and counted.checks[4][1] == [0, 1], counted.checks
    finally:
        rechecks.cancel()
        await asyncio.gather(rechecks, return_exceptions=True)
        await counted.close()
