"""`runledger verify log` against the real embedded broker: an intact log with a retried copy, then records
appended by someone who can write to the topic: a changed event, a fork and a gap."""

from __future__ import annotations

import os
import subprocess
import uuid
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from runledger.streams.producer.client import append_many
from runledger.streams.producer.events import NewEvent
from runledger.streams.settings import Settings
from runledger.streams.tools.verifylog import LogMissing, verify_log
from tests.conftest import CLI
from tests.integration.conftest import read_log, rehashed

RUN = [NewEvent("execution.started", {"workflow": "w"}), NewEvent("step.started", {"step_id": "s1", "name": "n"}),
       NewEvent("step.completed", {"step_id": "s1"}), NewEvent("execution.completed", {})]


def verify(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`verify log` of the log topic alone: these logs were never projected (PostgreSQL against the log is
    tests/integration/test_superuser_moves.py)."""
    return subprocess.run([*CLI, "verify", "log", "--no-database", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120, check=False)


async def appended(settings: Settings, streams: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Each stream's run appended through the producer; the events as the log holds them, by stream."""
    await append_many(settings, [(s, e) for s in streams for e in RUN], progress=False)
    events: dict[str, list[dict[str, Any]]] = {}
    for record in await read_log(settings):
        event = orjson.loads(record.value)
        events.setdefault(event["subject"], []).append(event)
    return events


async def produce(settings: Settings, values: list[tuple[str, bytes]]) -> None:
    """Raw records, as anyone who can write to the topic may append them."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_idempotence=False,
                                acks="all")
    await producer.start()
    try:
        for key, value in values:
            await producer.send_and_wait(settings.events_topic, value, key=key.encode())
    finally:
        await producer.stop()


async def test_a_forged_event_a_fork_and_a_gap_are_named_by_stream_and_seq(env: dict[str, str],
                                                                          settings: Settings) -> None:
    streams = [f"vl-{name}-{uuid.uuid4().hex[:6]}" for name in ("changed", "forked", "gap", "intact")]
    changed, forked, gap, intact = streams
    events = await appended(settings, streams)
    assert sorted(events) == sorted(streams) and all(len(e) == len(RUN) for e in events.values())
    await produce(settings, [(intact, orjson.dumps(events[intact][1]))])  # a producer's retry: an exact copy
    ok = verify(env, "--json")
    report = orjson.loads(ok.stdout)
    assert ok.returncode == 0 and report["intact"] is True, ok.stdout + ok.stderr
    assert (report["records"], report["events"], report["duplicates"], report["streams"]) == (17, 17, 1, 4)

    edited = {**events[changed][1], "data": {"step_id": "s1", "name": "edited"}}  # the hash it carries is the old
    fork = rehashed(events[forked][2], data={"step_id": "s1", "output": {"forged": True}})  # links to seq 2
    beyond = rehashed(events[gap][3], seq=6, prevhash="a" * 64)  # seq 5 never comes
    await produce(settings, [(changed, orjson.dumps(edited)), (forked, orjson.dumps(fork)),
                             (gap, orjson.dumps(beyond)), (intact, b"{not json")])
    machine = verify(env, "--json")
    report = orjson.loads(machine.stdout)
    assert machine.returncode == 1 and report["intact"] is False, machine.stdout + machine.stderr
    found = {(f["stream_id"], f["seq"], f["event_id"], f["code"]) for f in report["findings"]}
    assert found == {(changed, 2, edited["id"], "hash_mismatch"), (forked, 3, fork["id"], "seq_duplicate"),
                     (gap, 6, beyond["id"], "seq_gap"), ("", None, None, "not_json")}
    assert all(f"partition {f['partition']} offset {f['offset']}: " in f["reason"] for f in report["findings"])
    assert report["events"] == 20 and report["records"] == 21

    human = verify(env)
    assert human.returncode == 1, human.stderr
    assert f"NOT INTACT  {changed}  seq 2 (event {edited['id']})  hash_mismatch" in human.stdout
    assert f"NOT INTACT  {forked}  seq 3 (event {fork['id']})  seq_duplicate" in human.stdout
    assert f"NOT INTACT  {gap}  seq 6 (event {beyond['id']})  seq_gap: " in human.stdout
    assert "seq 5 is not in the log (the stream is intact up to seq 4)" in human.stdout
    assert f"NOT INTACT  {intact}" not in human.stdout and "NOT INTACT  the log  not_json" in human.stdout
    assert "20 events of 4 streams checked" in human.stdout


async def test_a_partition_whose_start_was_deleted_is_reported_and_the_rest_checked(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = f"vl-cut-{uuid.uuid4().hex[:6]}"
    await appended(settings, [stream])
    first = (await read_log(settings))[0]
    cut = TopicPartition(first.topic, first.partition)
    beginning_offsets = AIOKafkaConsumer.beginning_offsets

    async def after_retention(self: AIOKafkaConsumer, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Retention deleted seq 1 and 2 (the embedded broker has no DeleteRecords, so its answer says it)."""
        return {**await beginning_offsets(self, tps), cut: 2}

    monkeypatch.setattr(AIOKafkaConsumer, "beginning_offsets", after_retention)
    report = await verify_log(settings, database=False)
    assert [(f.stream_id, f.seq, f.code, f.partition, f.offset) for f in report.findings] == [
        ("", None, "log_start_deleted", cut.partition, 2), (stream, 3, "first_missing", cut.partition, 2)]
    assert "records before it were deleted (retention)" in report.findings[0].reason
    assert (report.records, report.events, report.streams) == (2, 2, 1)


async def test_a_log_topic_that_does_not_exist_is_refused_with_exit_2(env: dict[str, str],
                                                                      settings: Settings) -> None:
    with pytest.raises(LogMissing, match=f"topic {settings.events_topic} does not exist"):
        await verify_log(settings, database=False)
    done = verify(env, "--json")
    assert done.returncode == 2 and f"topic {settings.events_topic} does not exist" in done.stderr
    assert done.stdout == ""
