"""``runledger bench-webhooks``: what one webhook delivery worker sends to a local receiver.

Two measurements, each repeated ``runs`` times (a topic prefix and a consumer group of their own each time, one
schema for the invocation, dropped afterwards) and reported with the median, min and max over the runs:

- **throughput**: ``events`` events (``streams`` streams, chained, one endpoint owed all) are written to the log
  first; then a ``runledger webhooks worker`` starts and the receiver counts deliveries from the first to the last,
  so the figure is deliveries per second of a worker that has a backlog (its start-up is not in it);
- **latency**: with the worker running, events are written to the log at ``rate`` a second for ``seconds`` s
  (open loop: event ``i`` is due at ``t0 + i / rate``, its ``time`` set then), and each delivery's latency runs from
  the event's ``time`` to the receiver's answer: p50, p99 and max.

The receiver is an asyncio server in this process (HTTP parsed by httptools, 204 at once); it verifies nothing
(the tests do), it counts. The worker's CPU seconds are reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import asyncpg
import orjson
import psutil
from aiokafka import AIOKafkaProducer

from runledger.projections.postgres.db import connect_one, migrate
from runledger.projections.postgres.queries import quote_schema
from runledger.schemas.chain import Head
from runledger.streams.dev.benchpaths import Progress, machine
from runledger.streams.dev.benchserve import child_env, stop_process
from runledger.streams.dev.receiver import receiving
from runledger.streams.kafka import client_options
from runledger.streams.producer.events import NewEvent, build_events
from runledger.streams.settings import Settings

__all__ = ["bench_webhooks", "print_report"]


@dataclass
class _Receiver:
    """Counts deliveries: when each arrived (wall clock), and its event's time."""

    arrived: list[float] = field(default_factory=list)
    event_times: list[float] = field(default_factory=list)
    enough: asyncio.Event = field(default_factory=asyncio.Event)
    wanted: int = 0

    def reset(self, wanted: int) -> None:
        self.arrived, self.event_times, self.wanted = [], [], wanted
        self.enough.clear()

    def got(self, headers: dict[bytes, bytes], body: bytes) -> bool:
        self.arrived.append(time.time())
        self.event_times.append(datetime.fromisoformat(orjson.loads(body)["time"]).timestamp())
        if len(self.arrived) >= self.wanted:
            self.enough.set()
        return True


@contextlib.asynccontextmanager
async def _receiving() -> AsyncIterator[tuple[_Receiver, int]]:
    receiver = _Receiver()
    async with receiving(receiver.got) as port:
        yield receiver, port


class _Log:
    """Chained events written straight to a run's log topic, as the producer would write them."""

    def __init__(self, settings: Settings, streams: int, tag: str) -> None:
        self._settings = settings
        self._heads = {f"hook-{tag}-{n}": Head() for n in range(streams)}
        self._names = list(self._heads)
        self._kafka = AIOKafkaProducer(**client_options(settings), acks="all", linger_ms=5)

    async def __aenter__(self) -> _Log:
        await self._kafka.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._kafka.stop()

    def value(self, i: int) -> tuple[str, bytes]:
        stream = self._names[i % len(self._names)]
        head = self._heads[stream]
        event = NewEvent("execution.started" if head.seq == 0 else "step.started",
                         {"workflow": "bench-webhooks"} if head.seq == 0 else {"step_id": f"s{head.seq}",
                                                                              "name": "bench"},
                         time=datetime.now(UTC))
        batch = build_events("/bench/webhooks", stream, head, [event])
        self._heads[stream] = Head(batch.refs[-1].seq, batch.refs[-1].hash)
        return stream, batch.values[0]

    async def send(self, i: int) -> asyncio.Future[Any]:
        stream, value = self.value(i)
        future: asyncio.Future[Any] = await self._kafka.send(self._settings.events_topic, value, key=stream.encode())
        return future


def _spread(values: list[float], digits: int = 1) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def _cpu(process: subprocess.Popen[bytes]) -> float:
    try:
        times = psutil.Process(process.pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system + times.children_user + times.children_system)


@dataclass
class _Bench:
    settings: Settings
    schema: str
    keys: Path
    receiver: _Receiver
    port: int
    progress: Progress
    stamp: str

    def run_settings(self, run: str) -> tuple[Settings, dict[str, str]]:
        changes = {"db_schema": self.schema, "topic_prefix": f"benchhooks{self.stamp}{run}",
                   "consumer_group": f"benchhooks-{self.stamp}-{run}", "sources_key_file": str(self.keys / "key"),
                   "metrics_port": "0", "webhook_allow_private": "true"}
        own = self.settings.model_copy(update={
            k: (Path(v) if k.endswith("_file") else 0 if k == "metrics_port" else True if v == "true" else v)
            for k, v in changes.items()})
        return own, child_env(**changes)

    async def endpoint(self, own: Settings) -> None:
        """The run's endpoint, the only one not removed: owed every event of the run's log."""
        from runledger.streams.http.keys import load_key
        from runledger.streams.webhooks.endpoints import Filter, add_endpoint

        conn = await connect_one(own.database_dsn(), own.db_schema)
        try:
            await conn.execute("UPDATE webhook_endpoints SET removed_at = now(), enabled = false "
                               "WHERE removed_at IS NULL")
            await add_endpoint(conn, load_key(own), f"http://127.0.0.1:{self.port}/in", Filter(),
                               allow_private=True)
        finally:
            await conn.close()

    async def worker(self, env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "runledger.streams.cli", "webhooks", "worker"], env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    async def delivered(self, count: int, worker: subprocess.Popen[bytes], deadline_s: float) -> None:
        try:
            async with asyncio.timeout(deadline_s):
                while not self.receiver.enough.is_set():
                    if worker.poll() is not None:
                        raise RuntimeError(f"the delivery worker exited with {worker.returncode}: see "
                                           f"{self.keys / 'worker.log'}")
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await self.receiver.enough.wait()
        except TimeoutError:
            raise RuntimeError(f"{len(self.receiver.arrived)} of {count} deliveries within {deadline_s:.0f} s: see "
                               f"{self.keys / 'worker.log'}") from None

    async def throughput(self, run: int, events: int, streams: int) -> dict[str, Any]:
        from runledger.streams.topics import ensure_topics

        own, env = self.run_settings(f"t{run}")
        await ensure_topics(own, {own.events_topic: own.event_partitions})
        await self.endpoint(own)
        async with _Log(own, streams, f"t{run}") as log_:
            futures = [await log_.send(i) for i in range(events)]
            await asyncio.gather(*futures)
        self.receiver.reset(events)
        with (self.keys / "worker.log").open("ab") as log:
            worker = await self.worker(env, log)
            try:
                await self.delivered(events, worker, 600)
                cpu = _cpu(worker)
            finally:
                await stop_process(worker)
        arrived = sorted(self.receiver.arrived[:events])
        seconds = arrived[-1] - arrived[0]
        rate = (events - 1) / seconds if seconds > 0 else 0.0
        self.progress(f"  throughput run {run + 1}: {events:,} deliveries, {rate:,.0f}/s, worker CPU {cpu:.1f} s")
        return {"deliveries_per_s": rate, "seconds": seconds, "worker_cpu_s": cpu}

    async def latency(self, run: int, rate: float, seconds: float, streams: int) -> dict[str, Any]:
        from runledger.streams.topics import ensure_topics

        own, env = self.run_settings(f"l{run}")
        await ensure_topics(own, {own.events_topic: own.event_partitions})
        await self.endpoint(own)
        count = round(rate * seconds)
        with (self.keys / "worker.log").open("ab") as log:
            worker = await self.worker(env, log)
            try:
                async with _Log(own, streams, f"l{run}") as log_:
                    self.receiver.reset(1)  # warm: the worker has its partitions and has delivered once
                    await (await log_.send(0))
                    await self.delivered(1, worker, 120)
                    self.receiver.reset(count)
                    start = time.monotonic()
                    futures = []
                    for i in range(count):
                        wait = start + i / rate - time.monotonic()
                        if wait > 0:
                            await asyncio.sleep(wait)
                        futures.append(await log_.send(i + 1))
                    await asyncio.gather(*futures)
                    await self.delivered(count, worker, 120)
                cpu = _cpu(worker)
            finally:
                await stop_process(worker)
        delays = sorted((a - e) * 1000 for a, e in zip(self.receiver.arrived, self.receiver.event_times,
                                                      strict=True))
        p = {"p50": delays[len(delays) // 2], "p99": delays[min(len(delays) - 1, int(len(delays) * 0.99))],
             "max": delays[-1]}
        self.progress(f"  latency run {run + 1}: {count:,} events at {rate:g}/s: p50 {p['p50']:.1f} ms, p99 "
                      f"{p['p99']:.1f} ms, max {p['max']:.1f} ms, worker CPU {cpu:.1f} s")
        return {**p, "worker_cpu_s": cpu}


async def bench_webhooks(settings: Settings, *, runs: int, events: int, streams: int, rate: float, seconds: float,
                         latency_streams: int, command: str, progress: Progress) -> dict[str, Any]:
    from runledger.streams.http.keys import init_key

    stamp = f"{time.strftime('%Y%m%d%H%M%S', time.gmtime())}{uuid.uuid4().hex[:4]}"
    keys = Path(tempfile.mkdtemp(prefix="rl-bench-webhooks-"))
    schema = f"benchhooks_{stamp}"
    await migrate(settings.database_dsn(), schema)
    try:
        async with _receiving() as (receiver, port):
            bench = _Bench(settings, schema, keys, receiver, port, progress, stamp)
            init_key(bench.run_settings("k")[0])
            progress(f"receiver on port {port}; schema {schema}; the workers' log: {keys / 'worker.log'}")
            throughput = [await bench.throughput(r, events, streams) for r in range(runs)]
            latency = [await bench.latency(r, rate, seconds, latency_streams) for r in range(runs)]
    finally:
        admin = await asyncpg.connect(settings.database_dsn())
        try:
            await admin.execute(f"DROP SCHEMA IF EXISTS {quote_schema(schema)} CASCADE")
        finally:
            await admin.close()
    shutil.rmtree(keys, ignore_errors=True)
    return {
        "machine": machine(), "command": command, "runs": runs,
        "throughput": {"events": events, "streams": streams,
                       "deliveries_per_s": _spread([t["deliveries_per_s"] for t in throughput], 0),
                       "worker_cpu_s": [round(t["worker_cpu_s"], 1) for t in throughput]},
        "latency": {"rate": rate, "seconds": seconds, "streams": latency_streams,
                    **{k: _spread([r[k] for r in latency]) for k in ("p50", "p99", "max")},
                    "worker_cpu_s": [round(r["worker_cpu_s"], 1) for r in latency]},
    }


def print_report(report: dict[str, Any], out: IO[str]) -> None:
    m = report["machine"]
    t, lat = report["throughput"], report["latency"]

    def cell(s: dict[str, float], unit: str = "") -> str:
        return f"{s['median']:,g}{unit} ({s['min']:,g}-{s['max']:,g})"

    print(f"runledger bench-webhooks: {report['runs']} runs; {m['cpus']} CPUs, {m['memory_gib']} GiB, Python "
          f"{m['python']}; median (min-max) over the runs", file=out)
    print(f"  throughput, one worker, {t['events']:,} events over {t['streams']} streams: "
          f"{cell(t['deliveries_per_s'], '/s')}; worker CPU s {t['worker_cpu_s']}", file=out)
    print(f"  latency, event time to the receiver, {lat['rate']:g} events/s for {lat['seconds']:g} s over "
          f"{lat['streams']} streams: p50 {cell(lat['p50'], ' ms')}, p99 {cell(lat['p99'], ' ms')}, max "
          f"{cell(lat['max'], ' ms')}; worker CPU s {lat['worker_cpu_s']}", file=out)
