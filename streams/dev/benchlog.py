"""``runledger bench-log``: does the log stay fast as it grows? Produce and consume rates per slice of a long run.

Produces RECORDS records (VALUE_BYTES each, KEYS keys, BATCH sends in flight at a time, ``acks=all``) to a fresh
topic of PARTITIONS partitions on the running stack's broker, then reads them all back from the start with one
consumer, and reports both rates for every SLICE records, their median, min and max, and the last slices against
the first (a log whose cost grows with its size shows there). With the embedded durable log it also counts the
objects each partition holds in the log store. The topic is deleted afterwards unless ``keep``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import statistics
import time
import uuid
from collections.abc import Callable
from typing import IO, Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from runledger.schemas.errors import TransientError
from runledger.streams.kafka import client_options
from runledger.streams.settings import Settings

__all__ = ["bench_log", "print_report"]


async def bench_log(settings: Settings, *, records: int, slice_size: int, partitions: int, keys: int, batch: int,
                    value_bytes: int, keep: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    """Run the probe; the report's rates are records per second of each slice."""
    topic = f"{settings.topic_prefix}.bench-log.{uuid.uuid4().hex[:8]}"
    servers = client_options(settings)
    admin = AIOKafkaAdminClient(**servers)
    try:
        await admin.start()
        await admin.create_topics([NewTopic(topic, partitions, 1)])
        produced = await _produce(servers, topic, records, slice_size, keys, batch, value_bytes, progress)
        consumed = await _consume(servers, topic, partitions, records, slice_size, progress)
        objects = _objects_per_partition(settings, topic, partitions)
        if not keep:
            await admin.delete_topics([topic])
    except KafkaError as e:
        raise TransientError(f"the broker at {settings.kafka_bootstrap_servers}: {e}") from e
    finally:
        await admin.close()
    return {"topic": topic, "records": records, "slice": slice_size, "partitions": partitions, "keys": keys,
            "batch": batch, "value_bytes": value_bytes, "storage": settings.kafka_storage,
            "produce": _summary(produced), "consume": _summary(consumed), "objects_per_partition": objects,
            "kept": keep}


class _Slices:
    """The rate of each slice of ``size`` records, a slice ending at the first count at or past its mark."""

    def __init__(self, size: int, total: int, verb: str, progress: Callable[[str], None]) -> None:
        self.size, self.total, self.verb, self.progress = size, total, verb, progress
        self.rates: list[float] = []
        self._started, self._since, self._mark = time.perf_counter(), 0, size

    def reached(self, count: int) -> None:
        if count >= self._mark or count >= self.total:
            now = time.perf_counter()
            self.rates.append((count - self._since) / (now - self._started))
            self.progress(f"{self.verb} {count:,} records: {self.rates[-1]:,.0f}/s in the last slice")
            self._started, self._since, self._mark = now, count, self._mark + self.size


async def _produce(servers: dict[str, Any], topic: str, records: int, slice_size: int, keys: int, batch: int,
                   value_bytes: int, progress: Callable[[str], None]) -> list[float]:
    producer = AIOKafkaProducer(**servers, acks="all", linger_ms=5, max_batch_size=1 << 20)
    await producer.start()
    slices = _Slices(slice_size, records, "produced", progress)
    try:
        value = os.urandom(value_bytes // 2).hex().encode()
        for first in range(0, records, batch):
            sent = [await producer.send(topic, value, key=b"key-%d" % (i % keys))
                    for i in range(first, min(first + batch, records))]
            await asyncio.gather(*sent)
            slices.reached(first + len(sent))
    finally:
        await producer.stop()
    return slices.rates


async def _consume(servers: dict[str, Any], topic: str, partitions: int, records: int, slice_size: int,
                   progress: Callable[[str], None]) -> list[float]:
    consumer = AIOKafkaConsumer(**servers, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    slices = _Slices(slice_size, records, "consumed", progress)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        count, last_record = 0, time.perf_counter()
        while count < records:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=min(10_000, slice_size))
            if not fetched:
                if time.perf_counter() - last_record > 60:
                    raise TransientError(f"{topic} sent nothing for 60 s after {count:,} of {records:,} records")
                continue
            last_record = time.perf_counter()
            count += sum(len(batch) for batch in fetched.values())
            slices.reached(count)
    finally:
        await consumer.stop()
    return slices.rates


def _objects_per_partition(settings: Settings, topic: str, partitions: int) -> list[int] | None:
    """How many objects each partition's records are kept in, when the broker is the embedded durable one."""
    stack = settings.state_dir.resolve() / "stack.json"
    if settings.kafka_storage != "s3" or "kafka" not in settings.embedded or not stack.exists():
        return None
    store = (json.loads(stack.read_text()).get("kafka") or {}).get("store")
    if not store:
        return None
    conn = http.client.HTTPConnection("127.0.0.1", store["port"], timeout=30)
    counts = []
    try:
        for p in range(partitions):
            prefix, token, count = f"clusters/tansu_cluster/topics/{topic}/partitions/{p:010d}/records/", "", 0
            while True:
                conn.request("GET", f"/tansu?list-type=2&prefix={prefix}" + (f"&continuation-token={token}"
                                                                           if token else ""))
                body = conn.getresponse().read().decode()
                count += body.count("<Key>")
                found = re.search(r"<NextContinuationToken>([^<]+)<", body)
                if found is None:
                    break
                token = found[1]
            counts.append(count)
    finally:
        conn.close()
    return counts


def _summary(rates: list[float]) -> dict[str, Any]:
    quarter = max(1, len(rates) // 4)
    return {"per_slice": [round(r) for r in rates], "median": round(statistics.median(rates)),
            "min": round(min(rates)), "max": round(max(rates)),
            "last_over_first": round(rates[-1] / rates[0], 3),
            "last_quarter_over_first_quarter": round(statistics.mean(rates[-quarter:])
                                                     / statistics.mean(rates[:quarter]), 3)}


def print_report(report: dict[str, Any], out: IO[str]) -> None:
    print(f"{report['records']:,} records of {report['value_bytes']} bytes, {report['partitions']} partitions, "
          f"{report['keys']} keys, {report['batch']} sends in flight, log storage: {report['storage']}", file=out)
    print(f"{'records':>12}  {'produce/s':>10}  {'consume/s':>10}", file=out)
    for i, (produced, consumed) in enumerate(zip(report["produce"]["per_slice"], report["consume"]["per_slice"],
                                                 strict=True)):
        print(f"{min((i + 1) * report['slice'], report['records']):>12,}  {produced:>10,}  {consumed:>10,}", file=out)
    for name in ("produce", "consume"):
        s = report[name]
        print(f"{name}: median {s['median']:,}/s (min {s['min']:,}, max {s['max']:,}); last slice / first "
              f"{s['last_over_first']:.2f}, last quarter / first quarter {s['last_quarter_over_first_quarter']:.2f}",
              file=out)
    if report["objects_per_partition"] is not None:
        print(f"objects per partition in the log store: {report['objects_per_partition']}", file=out)
