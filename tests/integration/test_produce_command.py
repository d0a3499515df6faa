"""``runledger produce``: JSON lines in, events appended; one bad line and nothing is published."""

from __future__ import annotations

import os
import subprocess

import orjson

from runledger.schemas.chain import verify_chain
from runledger.streams.settings import Settings
from tests.conftest import CLI
from tests.integration.conftest import read_log


def _produce(env: dict[str, str], lines: list[dict[str, object]], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "produce", "--quiet", *args],
                          input="\n".join(orjson.dumps(line).decode() for line in lines),
                          env={**os.environ, **env}, capture_output=True, text=True, check=False, timeout=60)


async def test_produce_appends_lines_in_order_per_stream(env: dict[str, str], settings: Settings) -> None:
    lines = [{"stream": "a", "type": "execution.started", "data": {"workflow": "w"}},
             {"stream": "b", "type": "execution.started", "data": {"workflow": "w"}, "idempotency_key": "b1"},
             {"stream": "a", "type": "step.started", "data": {"step_id": "s", "name": "n"},
              "time": "2026-11-22T10:00:00Z"},
             {"stream": "b", "type": "execution.started", "data": {"workflow": "w"}, "idempotency_key": "b1"}]
    done = _produce(env, lines, "--json")
    assert done.returncode == 0, done.stderr
    printed = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert sorted((p["stream"], p["seq"], p["duplicate"]) for p in printed) == [
        ("a", 1, False), ("a", 2, False), ("b", 1, False), ("b", 1, True)]
    assert "appended 4 events to 2 streams" in done.stderr
    events = [orjson.loads(r.value) for r in await read_log(settings)]
    assert len(events) == 3 and verify_chain(events) == []
    assert next(e for e in events if e["seq"] == 2)["time"] == "2026-11-22T10:00:00.000Z"


async def test_one_bad_line_publishes_nothing(env: dict[str, str], settings: Settings) -> None:
    lines = [{"stream": "a", "type": "execution.started", "data": {"workflow": "w"}},
             {"stream": "a", "type": "cost.incurred", "data": {"provider": "p", "model": "m", "input_tokens": 1,
                                                               "output_tokens": 2, "cost_usd": 0.25}}]
    done = _produce(env, lines)
    assert done.returncode == 2
    assert "line 2: data.cost_usd: money must be a decimal string" in done.stderr
    for bad, message in [({"stream": "a b", "type": "execution.started", "data": {}}, "subject"),
                         ({"stream": "a", "type": "nope", "data": {}}, "type: unknown event type"),
                         ({"stream": "a", "data": {}}, "type: missing"),
                         ({"stream": "a", "type": "execution.started", "data": {"workflow": "w"}, "x": 1},
                          "x: unknown field")]:
        done = _produce(env, [lines[0], bad])
        assert done.returncode == 2 and f"line 2: {message}" in done.stderr, done.stderr
    assert await read_log(settings) == []


async def test_events_the_lifecycle_refuses_are_refused_with_the_workers_reason(env: dict[str, str],
                                                                                settings: Settings) -> None:
    start = {"stream": "a", "type": "execution.started", "data": {"workflow": "w"}}
    no_start = {"stream": "b", "type": "step.started", "data": {"step_id": "s", "name": "n"}}
    done = _produce(env, [start, no_start])
    assert done.returncode == 2, done.stderr
    assert "illegal_transition: step.started at seq 1 of 'b': the first event of a stream must be " \
           "execution.started" in done.stderr
    ended = [start, {"stream": "a", "type": "execution.completed", "data": {}}]
    assert _produce(env, ended).returncode == 0
    assert len(await read_log(settings)) == 2  # the refused file published nothing
    after = _produce(env, [{"stream": "a", "type": "step.started", "data": {"step_id": "s", "name": "n"}}])
    assert after.returncode == 2 and "illegal_transition" in after.stderr and \
        "the execution already ended (execution.completed)" in after.stderr, after.stderr
    again = _produce(env, [{**start, "stream": "c"}, {**start, "stream": "c"}])
    assert again.returncode == 2 and "execution.started must be seq 1" in again.stderr
    assert len(await read_log(settings)) == 2


async def test_an_event_over_512_kib_is_refused_before_anything_and_the_stream_goes_on(
        env: dict[str, str], settings: Settings) -> None:
    start = {"stream": "big", "type": "execution.started", "data": {"workflow": "w"}}
    huge = {"stream": "big", "type": "step.started", "data": {"step_id": "s", "name": "x" * 1_200_000}}
    done = _produce(env, [start, huge])
    assert done.returncode == 2, done.stderr
    assert "line 2" in done.stderr and "1,200,0" in done.stderr and "524,288" in done.stderr, done.stderr
    assert await read_log(settings) == []
    assert _produce(env, [start, {**huge, "data": {"step_id": "s", "name": "small"}}]).returncode == 0
    assert [orjson.loads(r.value)["seq"] for r in await read_log(settings)] == [1, 2]
