"""EventProducer against the real broker and Redis: chains, concurrency, crashes, bad input."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from decimal import Decimal
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from runledger.schemas.chain import verify_chain
from runledger.schemas.errors import InvalidEvent, UnknownType
from runledger.schemas.events import parse_event
from runledger.streams.producer.client import AppendConflict, EventProducer, PublishRefused
from runledger.streams.producer.events import NewEvent
from runledger.streams.settings import Settings
from tests.conftest import CLI
from tests.integration.conftest import poll, read_log, spawn_child

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


@pytest.mark.slow
async def test_eight_concurrent_producer_processes_never_fork_a_chain(env: dict[str, str],
                                                                      settings: Settings) -> None:
    async with EventProducer(settings) as producer:
        await producer.append("shared", "execution.started", {"workflow": "w"})
    children = [spawn_child(env, "ok", "shared", "500") for _ in range(8)]
    for child in children:
        _, err = await asyncio.to_thread(child.communicate, timeout=240)
        assert child.returncode == 0, err
    events = [orjson.loads(r.value) for r in await read_log(settings)]
    assert [e["seq"] for e in events] == list(range(1, 4002))
    assert len({e["id"] for e in events}) == 4001
    assert verify_chain(events) == []


@pytest.mark.slow
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


async def test_a_batch_the_broker_refuses_for_good_is_dropped_and_the_stream_goes_on(settings: Settings) -> None:
    async with EventProducer(settings) as producer:
        await producer.append("exec-1", "execution.started", {"workflow": "w"})
        # The broker side of "too large for this topic": the client's own limit, checked as the broker's would be.
        limit = producer._kafka._max_request_size  # noqa: SLF001
        producer._kafka._max_request_size = 2000  # noqa: SLF001
        with pytest.raises(PublishRefused, match=r"refuses seq 2\.\.2 for good") as refused:
            await producer.append("exec-1", "step.started", {"step_id": "big", "name": "x" * 3000})
        assert refused.value.code == "publish_refused" and not refused.value.transient
        producer._kafka._max_request_size = limit  # noqa: SLF001
        assert await producer._redis.exists(f"{settings.topic_prefix}:pending:exec-1") == 0  # noqa: SLF001
        after = await producer.append("exec-1", "step.started", {"step_id": "next", "name": "n"})
    assert after.seq == 2  # nothing of the refused batch is in the log, so its seq is free
    events = [orjson.loads(r.value) for r in await read_log(settings)]
    assert [e["seq"] for e in events] == [1, 2] and verify_chain(events) == []


async def test_a_batch_staged_by_a_producer_that_died_reaches_the_log_with_no_other_append(
        env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**env, "RUNLEDGER_PRODUCER_LEASE_MS": "500", "RUNLEDGER_PRODUCER_SWEEP_S": "0.5"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    async with EventProducer(settings) as producer:  # its sweeper runs every 0.5 s
        await producer.append("exec-1", "execution.started", {"workflow": "w"})
        child = spawn_child(env, "die-before-publish", "exec-1", "1")
        await asyncio.to_thread(child.communicate, timeout=60)
        assert child.returncode == -9  # killed with its batch staged, unpublished

        async def published() -> list[dict[str, object]] | None:
            events = [orjson.loads(r.value) for r in await read_log(settings)]
            return events if len(events) == 2 else None

        events = await poll(published, 20, "the staged event published by the sweeper")
    assert [e["seq"] for e in events] == [1, 2] and verify_chain(events) == []


async def test_heads_sweep_publishes_what_is_left_staged(env: dict[str, str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**env, "RUNLEDGER_PRODUCER_LEASE_MS": "300", "RUNLEDGER_PRODUCER_SWEEP_S": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    async with EventProducer(settings) as producer:
        await producer.append("exec-1", "execution.started", {"workflow": "w"})
    child = spawn_child(env, "die-before-publish", "exec-1", "1")
    await asyncio.to_thread(child.communicate, timeout=60)

    async def swept() -> str | None:
        done = await asyncio.to_thread(subprocess.run, [*CLI, "heads", "sweep",
                                                        "--json"], env={**os.environ, **env}, capture_output=True,
                                       text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout or None

    out = await poll(swept, 20, "heads sweep to publish the staged batch")
    assert orjson.loads(out) == {"stream": "exec-1", "first_seq": 2, "last_seq": 2}
    assert [orjson.loads(r.value)["seq"] for r in await read_log(settings)] == [1, 2]


async def test_a_sweep_finds_staged_batches_without_scanning_the_keyspace(env: dict[str, str],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**env, "RUNLEDGER_PRODUCER_LEASE_MS": "300", "RUNLEDGER_PRODUCER_SWEEP_S": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    async with EventProducer(settings) as producer:
        await producer.append("exec-1", "execution.started", {"workflow": "w"})
        child = spawn_child(env, "die-before-publish", "exec-1", "1")
        await asyncio.to_thread(child.communicate, timeout=60)
        redis = producer._redis  # noqa: SLF001
        staged = f"{settings.topic_prefix}:staged"
        assert await redis.smembers(staged) == {b"exec-1"}  # kept by the stage script
        scans = (await redis.info("commandstats")).get("cmdstat_scan", {}).get("calls", 0)

        async def swept() -> list[tuple[str, int, int]] | None:
            return await producer.sweep() or None  # nothing until the dead producer's lease expires

        assert await poll(swept, 20, "the sweep to publish the staged batch") == [("exec-1", 2, 2)]
        assert (await redis.info("commandstats")).get("cmdstat_scan", {}).get("calls", 0) == scans
        assert await redis.smembers(staged) == set()  # left by the commit script


async def test_one_producer_at_a_time_sweeps(env: dict[str, str]) -> None:
    settings = Settings(**{k.removeprefix("RUNLEDGER_").lower(): v for k, v in env.items()},
                        producer_sweep_s=0.1)
    rounds: dict[int, int] = {}
    producers = [EventProducer(settings) for _ in range(3)]
    running: list[EventProducer] = []
    try:
        for n, producer in enumerate(producers):
            sweep = producer.sweep

            async def counted(n: int = n, sweep: Any = sweep) -> list[tuple[str, int, int]]:
                rounds[n] = rounds.get(n, 0) + 1
                return await sweep()  # type: ignore[no-any-return]

            producer.sweep = counted  # type: ignore[method-assign]
            await producer.start()
            running.append(producer)
        await poll(lambda: asyncio.sleep(0, sum(rounds.values()) >= 10), 30, "ten sweeps")
        assert len(rounds) == 1, rounds  # the others never swept
        [elected] = rounds
        running.remove(producers[elected])
        await producers[elected].stop()  # it lets go of the sweeper's lock: another takes over
        before = dict(rounds)
        await poll(lambda: asyncio.sleep(0, any(rounds.get(n, 0) > before.get(n, 0) for n in range(3)
                                                if n != elected)), 30, "another producer to sweep")
    finally:
        for producer in running:
            await producer.stop()


async def test_a_retry_of_a_staged_batch_is_a_duplicate_not_a_lifecycle_error(settings: Settings) -> None:
    from runledger.streams.producer.events import build_events
    from runledger.streams.producer.heads import StreamHeads

    async with EventProducer(settings) as producer:
        await producer.append("exec-1", "execution.started", {"workflow": "w"})
        heads = StreamHeads(producer._redis, settings.topic_prefix, 60_000)  # noqa: SLF001
        ended = NewEvent("execution.completed", {}, idempotency_key="end")
        staged = build_events("/t", "exec-1", (await heads.read("exec-1", [])).head, [ended])
        await heads.acquire("exec-1", "dead", 1)
        await heads.stage("exec-1", "dead", staged)  # a producer whose publish failed: the batch stays staged
        await heads.release("exec-1", "dead")
        await producer.precheck("exec-1", [ended])  # its retry is no illegal second terminal event
        [again] = await producer.append_batch("exec-1", [ended])
    assert again.duplicate and again.seq == 2
    assert [orjson.loads(r.value)["seq"] for r in await read_log(settings)] == [1, 2]


async def test_the_producer_counts_its_appends_into_the_prometheus_registry(settings: Settings) -> None:
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    counted = [("runledger_appends_total", "appended"), ("runledger_appends_total", "duplicate"),
               ("runledger_appends_total", "refused"), ("runledger_append_seconds_count", ""),
               ("runledger_lease_wait_seconds_count", "")]
    before = {(name, outcome): sample(name, **({"outcome": outcome} if outcome else {})) for name, outcome in counted}

    def grew(name: str, outcome: str = "") -> float:
        return sample(name, **({"outcome": outcome} if outcome else {})) - before[(name, outcome)]

    keyed = [NewEvent("step.started", {"step_id": f"s{i}", "name": "n"}, f"k{i}") for i in range(3)]
    async with EventProducer(settings) as producer:
        await producer.append("exec-m", "execution.started", {"workflow": "w"})
        await producer.append_batch("exec-m", keyed)
        await producer.append_batch("exec-m", keyed)  # a retry: nothing new
        with pytest.raises(InvalidEvent):
            await producer.append("exec-m", "step.started", {"name": "no step id"})
    assert grew("runledger_appends_total", "appended") == 4
    assert grew("runledger_appends_total", "duplicate") == 3
    assert grew("runledger_appends_total", "refused") == 1
    assert grew("runledger_append_seconds_count") == 4 and grew("runledger_lease_wait_seconds_count") >= 3


async def test_redis_gone_mid_run_is_a_transient_error_and_loses_nothing(settings: Settings) -> None:
    from runledger.schemas.errors import TransientError

    async with EventProducer(settings) as producer:
        await producer.append("redis-gone", "execution.started", {"workflow": "w"}, idempotency_key="k1")
        pool = producer._redis.connection_pool  # Redis goes away: every new connection is refused
        port = pool.connection_kwargs["port"]
        pool.connection_kwargs["port"] = 1
        await pool.disconnect()
        pool.reset()  # new connections, made from the changed address
        with pytest.raises(TransientError, match="Redis failed during the append"):
            await producer.append("redis-gone", "step.started", {"step_id": "s1", "name": "n"}, idempotency_key="k2")
        with pytest.raises(TransientError, match="checking the head of 'redis-gone': Redis failed"):
            await producer.precheck("redis-gone", [NewEvent("step.started", {"step_id": "s1", "name": "n"})])
        with pytest.raises(TransientError, match="sweeping staged batches: Redis failed"):
            await producer.sweep()
        pool.connection_kwargs["port"] = port  # back: the same append again lands once
        pool.reset()
        again = await producer.append("redis-gone", "step.started", {"step_id": "s1", "name": "n"},
                                      idempotency_key="k2")
        assert again.seq == 2


async def test_an_append_takes_three_redis_round_trips_and_leaves_no_lease(settings: Settings) -> None:
    """Lease and read in one script, stage, commit (which drops the lease): no separate lease, read or release."""
    async with EventProducer(settings) as producer:
        await producer.append("exec-rt", "execution.started", {"workflow": "w"})
        redis = producer._redis  # noqa: SLF001 - the producer's own client, to count what it sends
        sent: list[str] = []
        real = redis.execute_command

        async def counted(*args: Any, **options: Any) -> Any:
            if any("exec-rt" in str(a) for a in args):  # not the sweeper's election, on the same client
                sent.append(str(args[0]))
            return await real(*args, **options)

        redis.execute_command = counted  # type: ignore[method-assign]
        try:
            await producer.append("exec-rt", "step.started", {"step_id": "s1", "name": "n"})
            await producer.append_batch("exec-rt", [step(2), step(3)])
        finally:
            redis.execute_command = real  # type: ignore[method-assign]
        assert len(sent) == 6, sent
        assert not await redis.exists(f"{settings.topic_prefix}:lease:exec-rt")
    assert [orjson.loads(r.value)["seq"] for r in await read_log(settings)] == [1, 2, 3, 4]


async def test_the_readiness_probe_asks_kafka_for_the_log_topic_only(settings: Settings) -> None:
    """serve probes Kafka every second: the whole cluster's metadata cost 4 ms of CPU a probe with 106 topics."""
    async with EventProducer(settings) as producer:
        client = producer._kafka.client  # noqa: SLF001 - what the probe asks the broker
        asked: list[Any] = []
        real = client._metadata_update  # noqa: SLF001

        async def recorded(cluster: Any, topics: Any) -> Any:
            asked.append(set(topics) if topics else None)
            return await real(cluster, topics)

        client._metadata_update = recorded  # noqa: SLF001
        assert await producer.ready() == {"kafka": None, "redis": None}
    assert asked and all(topics == {settings.events_topic} for topics in asked), asked


async def test_a_stage_whose_reply_was_lost_is_asked_again_and_the_append_answered_as_it_went(
        settings: Settings) -> None:
    """Redis stopped after running the stage script but before its reply: the batch was staged, so the sweeper
    would publish it whatever the append answered. Asked again, the stage says it staged it: published, answered."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from runledger.streams.producer.heads import StreamHeads

    async with EventProducer(settings) as producer:
        await producer.append("exec-lost", "execution.started", {"workflow": "w"})
        heads = producer._heads  # noqa: SLF001 - the stage's reply is what the test loses
        real = StreamHeads.stage
        lost = [1, 1]  # two replies lost in a row

        async def stage_reply_lost(self: StreamHeads, *args: Any) -> bool:
            done = await real(self, *args)
            if lost:
                lost.pop()
                raise RedisConnectionError("Connection closed by server.")
            return done

        heads.stage = stage_reply_lost.__get__(heads)  # type: ignore[method-assign]
        appended = await producer.append("exec-lost", "step.started", {"step_id": "s1", "name": "n"})
    assert appended.seq == 2 and not lost
    seqs = [orjson.loads(r.value)["seq"] for r in await read_log(settings)]
    assert seqs == [1, 2]
