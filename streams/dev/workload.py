"""The benchmark's workload: a simulated fleet's events in the order live traffic has them.

Many executions run at once, so the log interleaves their events: ``open_streams`` executions are under
way at any moment and each next event comes from one of them at random. Every event type of the
simulated fleet occurs (starts, steps, retries, costs, artifacts, every kind of end). With a ``rate``,
event ``i`` carries the time ``start + i / rate``: when it is to be sent, so that the time from an event's
``time`` to its commit is the latency a producer sees.
"""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import datetime, timedelta

from runledger.schemas.chain import Head
from runledger.streams.dev.fleet import Execution, simulate_fleet
from runledger.streams.producer.events import build_events

__all__ = ["EVENTS_PER_EXECUTION", "Workload", "live_order"]

EVENTS_PER_EXECUTION = 15  # about, in the simulated fleet


def live_order(lengths: list[int], *, open_streams: int, seed: int) -> list[tuple[int, int]]:
    """(execution, event index) pairs: every event of every execution, each execution's in order, with
    ``open_streams`` executions under way at a time and the next event drawn from one of them at random."""
    rng = random.Random(seed)  # noqa: S311 - simulation, not security
    waiting = iter(range(len(lengths)))
    running: list[list[int]] = []  # [execution, next event index]
    order: list[tuple[int, int]] = []
    while True:
        while len(running) < open_streams and (nxt := next(waiting, None)) is not None:
            running.append([nxt, 0])
        if not running:
            return order
        slot = rng.randrange(len(running))
        execution, index = running[slot]
        order.append((execution, index))
        if index + 1 == lengths[execution]:
            running[slot] = running[-1]
            running.pop()
        else:
            running[slot][1] = index + 1


class Workload:
    """About ``events`` encoded events of a simulated fleet, in live order: ``records`` is (key, value) pairs."""

    def __init__(self, events: int, *, run_tag: str, seed: int = 1, open_streams: int = 500,
                 start: datetime | None = None, rate: float | None = None) -> None:
        executions = simulate_fleet(max(events // EVENTS_PER_EXECUTION, 1), seed=seed, run_tag=run_tag)
        order = live_order([len(e.events) for e in executions], open_streams=open_streams, seed=seed)
        if rate is not None and start is not None:
            executions = _scheduled(executions, order, start, rate)
        values = [build_events("/bench", e.stream_id, Head(), e.events).values for e in executions]
        self.records = [(executions[x].stream_id.encode(), values[x][i]) for x, i in order]
        self.streams = len(executions)

    def __len__(self) -> int:
        return len(self.records)


def _scheduled(executions: list[Execution], order: list[tuple[int, int]], start: datetime,
               rate: float) -> list[Execution]:
    """The executions with event ``i`` of ``order`` timed ``start + i / rate``."""
    events = [list(e.events) for e in executions]
    for n, (x, i) in enumerate(order):
        events[x][i] = replace(events[x][i], time=start + timedelta(seconds=n / rate))
    return [replace(e, events=timed) for e, timed in zip(executions, events, strict=True)]
