"""EventProducer against the real broker and Redis: chains, concurrency, crashes, bad input."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import orjson
import pytest

from schemas.chain import verify_chain
from schemas.errors import InvalidEvent, UnknownType
from schemas.events import parse_event
from streams.producer import AppendConflict, EventProducer, NewEvent
from streams.settings import Settings
from tests.integration.conftest import read_log, spawn_child

START = NewEvent("execution.started", {"workflow": "w"})


def step(i: int) -> NewEvent:
    return NewEvent("step.started", {"step_id": f"s{i}", "name": "n"})


async def test_appends_form_an_intact_chain_keyed_by_stream(settings: Settings) -> None:
    async with EventProducer(settings) as producer:
        first = await producer.append("exec-1", "execution.started", {"workflow": "w", "budget_usd": Decimal("2.5")})
        rest = await producer.append_batch("exec-1", [step(i) for i in range(5)])
        other = await producer.append("exec-2", "execution.started", {"workflow": "w"})
    assert [first.seq, *[a.seq for a in rest]] == [1, 2, 3, 4, 5, 6] and other.seq == 1
    records = await read_log(settings)
    assert len(records) == 7
    events = [orjson.loads(r.value) for r in records]
    assert verify_chain(events) == []
    for record, event in zip(records, events, strict=True):
        assert record.key == event["subject"].encode()
        assert dict(record.headers)["content-type"] == b"application/cloudevents+json; charset=UTF-8"
        parse_event(record.value)
    assert next(e for e in events if e["subject"] == "exec-1")["data"]["budget_usd"] == "2.5"


async def test_expected_seq_conflict_is_clear_and_publishes_nothing(settings: Settings) -> None:
    async with EventProducer(settings) as producer:
        await producer.append("exec-1", "execution.started", {"workflow": "w"}, expected_seq=0)
        with pytest.raises(AppendConflict, match="expected_seq 0, but the stream is at seq 1"):
            await producer.append("exec-1", "execution.started", {"workflow": "w"}, expected_seq=0)
        await producer.append_batch("exec-1", [step(1)], expected_seq=1)
    assert [orjson.loads(r.value)["seq"] for r in await read_log(settings)] == [1, 2]


async def test_retry_with_the_same_idempotency_key_appends_once(settings: Settings) -> None:
    async with EventProducer(settings) as producer:
        first = await producer.append("exec-1", "execution.started", {"workflow": "w"}, idempotency_key="k1")
        again = await producer.append("exec-1", "execution.started", {"workflow": "w"}, idempotency_key="k1")
        mixed = await producer.append_batch("exec-1", [NewEvent("step.started", {"step_id": "a", "name": "n"},
                                                                idempotency_key="k1"),
                                                       NewEvent("step.started", {"step_id": "b", "name": "n"},
                                                                idempotency_key="k2")])
    assert (again.seq, again.id, again.duplicate) == (first.seq, first.id, True)
    assert [(m.seq, m.duplicate) for m in mixed] == [(1, True), (2, False)]
    assert len(await read_log(settings)) == 2


@pytest.mark.parametrize(
    ("stream", "event", "error", "field"),
    [
        ("exec-1", NewEvent("agent.exploded", {}), UnknownType, "type"),
        ("exec-1", NewEvent("cost.incurred", {"provider": "p", "model": "m", "input_tokens": 1,
                                              "output_tokens": 1, "cost_usd": 0.1}), InvalidEvent, "data.cost_usd"),
        ("exec-1", NewEvent("execution.started", {"agent_id": "a"}), InvalidEvent, "data.workflow"),
        ("exec 1/bad", START, InvalidEvent, "subject"),
    ],
    ids=["unknown-type", "float-money", "missing-field", "bad-stream-id"],
)
async def test_invalid_append_names_the_field_and_publishes_nothing(
        settings: Settings, stream: str, event: NewEvent, error: type, field: str) -> None:
    async with EventProducer(settings) as producer:
        await producer.append("exec-0", "execution.started", {"workflow": "w"})
        with pytest.raises(error) as caught:
            await producer.append_batch(stream, [START, event] if stream == "exec-1" else [event])
        assert caught.value.field == field
    assert [orjson.loads(r.value)["subject"] for r in await read_log(settings)] == ["exec-0"]


async def test_eight_concurrent_producer_processes_never_fork_a_chain(env: dict[str, str],
                                                                      settings: Settings) -> None:
    async with EventProducer(settings) as producer:
        await producer.append("shared", "execution.started", {"workflow": "w"})
    children = [spawn_child(env, "ok", "shared", "500") for _ in range(8)]
    for child in children:
        out, err = await asyncio.to_thread(child.communicate, timeout=240)
        assert child.returncode == 0, err
    events = [orjson.loads(r.value) for r in await read_log(settings)]
    assert [e["seq"] for e in events] == list(range(1, 4002))
    assert len({e["id"] for e in events}) == 4001
    assert verify_chain(events) == []


@pytest.mark.parametrize("moment", ["die-before-publish", "die-after-publish"])
async def test_a_producer_killed_mid_append_blocks_and_forks_nothing(env: dict[str, str], moment: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**env, "RUNLEDGER_PRODUCER_LEASE_MS": "1000"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    async with EventProducer(settings) as producer:
        await producer.append("exec-1", "execution.started", {"workflow": "w"})
        child = spawn_child(env, moment, "exec-1", "1")
        await asyncio.to_thread(child.communicate, timeout=60)
        assert child.returncode == -9  # SIGKILL, mid-append
        started = time.monotonic()
        after = await producer.append("exec-1", "step.started", {"step_id": "after", "name": "n"})
        waited = time.monotonic() - started
    assert after.seq == 3  # the dead producer's staged event became seq 2, rolled forward
    assert waited < 5
    records = await read_log(settings)
    events = [orjson.loads(r.value) for r in records]
    unique = list({e["id"]: e for e in events}.values())
    assert [e["seq"] for e in unique] == [1, 2, 3]
    assert verify_chain(unique) == []
    copies = [r.value for r in records if orjson.loads(r.value)["seq"] == 2]
    assert len(set(copies)) == 1  # a copy published twice is the very same event, never a fork
    assert len(copies) == (2 if moment == "die-after-publish" else 1)
