"""The benchmark's workload: live order keeps each execution's order and as many under way as asked."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from runledger.schemas.chain import verify_chain
from runledger.streams.dev.workload import Workload, live_order


def test_live_order_has_every_event_once_in_execution_order_and_the_asked_concurrency() -> None:
    lengths = [3, 5, 1, 7, 2, 4] * 20
    order = live_order(lengths, open_streams=10, seed=4)
    assert sorted(order) == [(x, i) for x, n in enumerate(lengths) for i in range(n)]
    seen: dict[int, int] = {}
    under_way, most = set(), 0
    for x, i in order:
        assert seen.get(x, -1) == i - 1
        seen[x] = i
        under_way.add(x)
        most = max(most, len(under_way))
        if i == lengths[x] - 1:
            under_way.discard(x)
    assert most == 10


def test_a_rated_workload_times_event_i_at_start_plus_i_over_rate() -> None:
    start = datetime(2026, 11, 23, 12, tzinfo=UTC)
    workload = Workload(600, run_tag="t", start=start, rate=200)
    events = [orjson.loads(value) for _, value in workload.records]
    assert events[0]["time"] == "2026-11-23T12:00:00.000Z" and events[200]["time"] == "2026-11-23T12:00:01.000Z"
    by_stream: dict[str, list[dict]] = {}  # type: ignore[type-arg]
    for event in events:
        by_stream.setdefault(event["subject"], []).append(event)
    assert len(by_stream) == workload.streams and all(not verify_chain(s) for s in by_stream.values())
    assert len({e["type"] for e in events}) >= 8
