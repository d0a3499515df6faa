"""Helpers for tests against the real embedded stack."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from runledger.schemas.chain import GENESIS_HASH, compute_hash
from runledger.streams.kafka import read_to_end
from runledger.streams.settings import Settings
from tests.conftest import CLI, VECTOR_EVENTS

T = TypeVar("T")

CHILD = Path(__file__).with_name("append_child.py")


async def read_log(settings: Settings, topic: str | None = None) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` (default: the events topic), partition by partition, in log order."""
    topic = topic or settings.events_topic
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - a brand-new topic
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            return []
        consumer.assign(partitions)
        for tp, start in (await consumer.beginning_offsets(partitions)).items():
            consumer.seek(tp, start)
        records: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {tp: [] for tp in partitions}
        await read_to_end(consumer, partitions, lambda tp, messages: records[tp].extend(messages))
        return [r for tp in partitions for r in records[tp]]
    finally:
        await consumer.stop()


async def write_log(settings: Settings, events: list[dict[str, Any]] | list[bytes]) -> None:
    """Produce ``events`` to the log topic, one by one, keyed by stream (records that are no event: key ``raw``),
    past the producer: as a client that can write the log may."""
    import orjson
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        for e in events:
            value = e if isinstance(e, bytes) else orjson.dumps(e)
            key = b"raw" if isinstance(e, bytes) else str(e["subject"]).encode()
            await producer.send_and_wait(settings.events_topic, value, key=key)
    finally:
        await producer.stop()


def spawn_child(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """Run ``append_child.py`` in a process of its own, with the test's RUNLEDGER_* settings."""
    return subprocess.Popen([sys.executable, str(CHILD), *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


FIRST_STREAM = VECTOR_EVENTS[:9]  # execution.started, steps s1 and s2 with costs, execution.completed


def rechain(subject: str, events: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """``events`` (default: the first vector stream) as a new stream: new subject, ids, prevhashes and hashes."""
    out, prev = [], GENESIS_HASH
    for event in events or FIRST_STREAM:
        event = {**event, "subject": subject, "id": str(uuid.uuid4()), "prevhash": prev}
        event["hash"] = prev = compute_hash(event)
        out.append(event)
    return out


def rehashed(event: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``event`` with ``changes`` and a new id, hashed again (so only the changes are wrong, not the hash)."""
    event = {**event, "id": str(uuid.uuid4()), **changes}
    event["hash"] = compute_hash(event)
    return event


def settings_of(env: dict[str, str]) -> Settings:
    return Settings(**{k.removeprefix("RUNLEDGER_").lower(): v for k, v in env.items()})


def worker_log(worker: subprocess.Popen[bytes]) -> str:
    """What a ``running_worker`` has logged so far."""
    fd = worker.log.fileno()  # type: ignore[attr-defined]
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


@contextlib.asynccontextmanager
async def running_worker(env: dict[str, str], *, loglevel: str = "warning",
                         command: tuple[str, ...] = ("worker",)) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A ``runledger worker`` process (or ``command``: ``("webhooks", "worker")``) with ``env``; its log
    (``worker_log``) is shown if the test fails.

    It is stopped without blocking the event loop, which may serve its connections (a proxy). Its schema is
    migrated first, as the owner: a worker's login applies no migration."""
    from runledger.projections.postgres.db import migrate

    settings = settings_of(env)
    await migrate(settings.database_url, settings.db_schema)
    log = tempfile.TemporaryFile()
    worker = subprocess.Popen([*CLI, *command, "--loglevel", loglevel],
                              env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    worker.log = log  # type: ignore[attr-defined]
    try:
        yield worker
    except BaseException:
        log.seek(0)
        sys.stderr.write(log.read().decode(errors="replace")[-20000:])
        raise
    finally:
        try:
            if not await terminate(worker, 30):
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace")[-20000:])
                raise AssertionError("the worker did not stop within 30 s of SIGTERM")
        finally:
            log.close()


async def terminate(process: subprocess.Popen[bytes], grace_s: float) -> bool:
    """SIGTERM ``process`` and wait for it without blocking the event loop; SIGKILL it if it has not ended
    within ``grace_s``. True if it ended on SIGTERM (or before)."""
    from runledger.streams.dev.benchserve import stop_process

    return await stop_process(process, grace_s)


async def poll(check: Callable[[], Awaitable[T | None]], deadline_s: float, what: str) -> T:
    """Call ``check`` every 0.25 s until it returns something, or fail after ``deadline_s`` seconds."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = await check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")
        await asyncio.sleep(0.25)


class KafkaLedger:
    """A deployment of its own on the session stack: a topic prefix, a migrated schema, a signer key, and a store
    that projects what the log topic holds exactly as a worker does (``project``), with the records' real log
    positions. ``run`` runs the command line on it."""

    def __init__(self, settings: Settings, env: dict[str, str], store: Any, conn: Any) -> None:
        self.settings, self.env, self.store, self.conn = settings, env, store, conn
        self._applied: set[tuple[int, int]] = set()

    async def append(self, events: list[dict[str, Any]] | list[bytes]) -> None:
        """Produce ``events`` to the log topic, keyed by stream (records that are no event: key ``raw``)."""
        await write_log(self.settings, events)

    async def project(self) -> int:
        """Apply the log's records not applied yet, partition by partition, in log order; how many."""
        from runledger.projections.records import LogRecord

        fresh = [r for r in await read_log(self.settings) if (r.partition, r.offset) not in self._applied]
        for partition in sorted({r.partition for r in fresh}):
            await self.store.apply_batch([LogRecord(r.topic, r.partition, r.offset, r.key, r.value or b"")
                                          for r in fresh if r.partition == partition])
        self._applied |= {(r.partition, r.offset) for r in fresh}
        return len(fresh)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=180)


@contextlib.asynccontextmanager
async def kafka_ledger(env: dict[str, str], key_dir: Path, monkeypatch: Any,
                       partitions: int = 2) -> AsyncIterator[KafkaLedger]:
    """A ``KafkaLedger``: its log topic with ``partitions`` partitions, its schema, its signer key in ``key_dir``
    (the test's environment set to it, so in-process calls of ``Settings()`` see it too)."""
    import asyncpg

    from runledger.projections.postgres.db import connect, migrate
    from runledger.projections.postgres.store import ProjectionStore
    from runledger.projections.pricing import load_tokencost_catalog
    from runledger.streams.topics import ensure_topics

    schema = f"t_{uuid.uuid4().hex[:12]}"
    env = {**env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CHECKPOINT_KEY": str(key_dir / "checkpoint.key"),
           "RUNLEDGER_CHECKPOINT_ORIGIN": "runledger.test/log"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    await ensure_topics(settings, {settings.events_topic: partitions})
    await migrate(settings.database_url, schema)
    pool = await connect(settings.database_dsn("worker"), schema)
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": schema})
    catalog = load_tokencost_catalog()
    await ProjectionStore.save_catalog(pool, catalog)  # as a worker does: the prices verify projection re-prices with
    try:
        yield KafkaLedger(settings, env, ProjectionStore(pool, catalog, settings.consumer_group), conn)
    finally:
        await pool.close()
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


def auditor_code() -> dict[str, Any]:
    """The Python of docs/proofs.md, run as an auditor would copy it: its ``partition_root`` (hashlib alone),
    ``open_checkpoint`` and ``root_from_inclusion``."""
    import re

    text = (Path(__file__).parents[2] / "docs" / "proofs.md").read_text()
    namespace: dict[str, Any] = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        exec(compile(block, "docs/proofs.md", "exec"), namespace)  # noqa: S102 - the documentation's own code
    return namespace


def independent_root(values: list[bytes]) -> bytes:
    """The root of a partition's first ``len(values)`` records as docs/proofs.md tells an auditor to compute it."""
    return auditor_code()["partition_root"](values)  # type: ignore[no-any-return]
