"""``runledger bench-http``: what one ``runledger serve`` process takes, measured with signed requests.

Three measurements, each repeated ``runs`` times and reported with its median, min and max over the runs:

- **batches**: events appended per second with batches of ``batch`` events (closed loop: ``concurrency`` requests
  in flight, each batch a new stream);
- **single**: one-event requests started at a fixed rate, **open loop**: request ``i`` is due at ``t0 + i / rate``
  and sent then whatever the earlier ones do, and its latency runs from when it was *due* to its 2xx, so a server
  that falls behind shows its queue in the figures (no coordinated omission);
- **reads**: each read endpoint in turn at a fixed rate, open loop the same way, p50/p99/max per endpoint, once a
  worker has projected the streams and a checkpoint is signed (so every read answers 200).

By default it starts ``serve`` itself as a subprocess on a free port, on a schema, topics, sources key and source
of its own (dropped afterwards), with a ``runledger worker`` for the reads. ``--url`` targets a running one instead
(``--source`` and ``--secret-file``: a source granted every stream); then the reads use what that server holds.
The client is one asyncio process with keep-alive connections of its own (``httpload``: responses parsed by
httptools, a few tens of microseconds of CPU a request); its CPU and the server's are reported, so a figure limited
by the client says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
import psutil

from runledger.streams.dev.benchpaths import Progress, machine
from runledger.streams.dev.httpload import HttpLoadClient, SignedRequests

__all__ = ["Client", "Target", "bench_http", "print_report"]

STARTED = {"type": "execution.started", "data": {"workflow": "bench-http"}}
READS = ("list", "execution", "events", "proof", "checkpoints")


def _step(i: int) -> dict[str, Any]:
    return {"type": "step.started", "data": {"step_id": f"s{i}", "name": "bench"}}


@dataclass
class Target:
    """A ``serve`` to measure: its URL, and the source the requests are signed as."""

    url: str
    source_id: str
    secret: str
    pid: int | None = None  # the server's process, when on this host: its CPU is reported
    streams: list[str] = field(default_factory=list)  # streams to read; an event id of each for proofs
    event_ids: list[str] = field(default_factory=list)


class Client:
    """Signed requests (Standard Webhooks v1) over ``connections`` keep-alive connections of the lean load client
    (``httpload``): a few tens of microseconds of CPU a request, so the client is not what is measured."""

    def __init__(self, target: Target, connections: int) -> None:
        self.target = target
        self._http = HttpLoadClient(target.url, connections, SignedRequests(target.source_id, target.secret))

    async def append(self, stream: str, events: Any) -> tuple[int, Any]:
        return await self._http.request("POST", f"/v1/streams/{stream}/events", orjson.dumps(events))

    async def get(self, path: str) -> int:
        return (await self._http.request("GET", path))[0]

    async def close(self) -> None:
        await self._http.close()


def _spread(values: list[float], digits: int = 1) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def _percentiles(latencies: list[float]) -> dict[str, float]:
    s = sorted(latencies) or [float("nan")]
    return {"p50_ms": round(statistics.median(s) * 1000, 1),
            "p99_ms": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1000, 1), "max_ms": round(s[-1] * 1000, 1)}


class CpuMeter:
    """CPU seconds of this process and of the server (when its pid is known) over a block."""

    def __init__(self, server_pid: int | None) -> None:
        self._me = psutil.Process()
        self._server = psutil.Process(server_pid) if server_pid else None
        self.client_s = self.server_s = 0.0

    @staticmethod
    def _cpu(p: psutil.Process, children: bool) -> float:
        """CPU seconds of ``p`` now, and of its children with ``children`` (uvicorn's worker processes with
        ``--workers``). The client's own are counted without its children: ``serve`` is one of them."""
        total = 0.0
        for proc in (p, *(p.children(recursive=True) if children else ())):
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
        return total

    @contextlib.contextmanager
    def measure(self) -> Any:
        c0 = self._cpu(self._me, children=False)
        s0 = self._cpu(self._server, children=True) if self._server else 0.0
        yield self
        self.client_s = self._cpu(self._me, children=False) - c0
        self.server_s = (self._cpu(self._server, children=True) - s0) if self._server else float("nan")


async def _batches(client: Client, run: int, *, batches: int, batch: int, concurrency: int) -> dict[str, Any]:
    """``batches`` batches of ``batch`` events, each a new stream, ``concurrency`` in flight."""
    stamp = uuid.uuid4().hex[:8]
    bodies = [(f"bench-http-{stamp}-{run}-{i}", [STARTED, *(_step(j) for j in range(batch - 1))])
              for i in range(batches)]
    failed: list[int] = []
    queue = list(reversed(bodies))

    async def loop() -> None:
        while queue:
            stream, events = queue.pop()
            status, content = await client.append(stream, events)
            if status != 201:
                failed.append(status)
            elif len(client.target.streams) < 200:
                client.target.streams.append(stream)
                client.target.event_ids.append(orjson.loads(content)["events"][-1]["id"])

    meter = CpuMeter(client.target.pid)
    with meter.measure():
        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    appended = (batches - len(failed)) * batch
    return {"events": appended, "seconds": round(seconds, 3), "events_per_s": round(appended / seconds, 1),
            "failed": len(failed), "statuses": sorted(set(failed)), "client_cpu_s": round(meter.client_s, 2),
            "server_cpu_s": round(meter.server_s, 2)}


async def open_loop(rate: float, count: int, send: Callable[[int], Awaitable[bool]],
                    server_pid: int | None = None) -> dict[str, Any]:
    """Start ``send(i)`` at ``t0 + i / rate`` for ``i`` in ``range(count)``, whatever the earlier ones do; each one's
    latency runs from when it was due to when it answered 2xx (``send`` returns True). p50/p99/max over the 2xx,
    the count of the others, and how late the client itself started requests (its own lag: if large, the client
    is the bottleneck, not the server)."""
    latencies: list[float] = []
    failures = 0
    lag = 0.0
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, due: float) -> None:
        nonlocal failures
        try:
            ok = await send(i)
        except Exception:  # noqa: BLE001 - a transport error counts as a failed request
            ok = False
        if ok:
            latencies.append(time.perf_counter() - due)
        else:
            failures += 1

    meter = CpuMeter(server_pid)
    with meter.measure():
        t0 = time.perf_counter() + 0.05
        i = 0
        while i < count:
            now = time.perf_counter()
            while i < count and t0 + i / rate <= now:
                due = t0 + i / rate
                lag = max(lag, now - due)
                task = asyncio.create_task(one(i, due))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            if i < count:
                await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        if tasks:
            await asyncio.gather(*tasks)
        seconds = time.perf_counter() - t0
    return {"requests": count, "ok": len(latencies), "failed": failures, **_percentiles(latencies),
            "achieved_per_s": round(count / seconds, 1), "client_lag_max_ms": round(lag * 1000, 1),
            "client_cpu_s": round(meter.client_s, 2), "server_cpu_s": round(meter.server_s, 2)}


async def _single(client: Client, run: int, *, rate: float, seconds: float, streams: int) -> dict[str, Any]:
    """One-event requests at ``rate``, round robin over ``streams`` streams started beforehand."""
    stamp = uuid.uuid4().hex[:8]
    names = [f"bench-http-{stamp}-single{run}-{i}" for i in range(streams)]
    for name in names:
        status, content = await client.append(name, [STARTED])
        if status != 201:
            raise RuntimeError(f"starting {name}: {status} {content[:300]!r}")

    async def send(i: int) -> bool:
        status, _ = await client.append(names[i % streams], _step(i))
        return status == 201

    return await open_loop(rate, max(1, int(rate * seconds)), send, client.target.pid)


def _read_paths(target: Target) -> dict[str, Callable[[int], str]]:
    s, ids = target.streams, target.event_ids
    return {"list": lambda i: "/v1/executions?limit=50",
            "execution": lambda i: f"/v1/executions/{s[i % len(s)]}",
            "events": lambda i: f"/v1/executions/{s[i % len(s)]}/events",
            "proof": lambda i: f"/v1/events/{ids[i % len(ids)]}/proof",
            "checkpoints": lambda i: "/v1/checkpoints/latest"}


async def _reads(client: Client, *, rate: float, seconds: float) -> dict[str, dict[str, Any]]:
    out = {}
    for name, path in _read_paths(client.target).items():
        if name in ("execution", "events", "proof") and not client.target.streams:
            continue

        async def send(i: int, path: Callable[[int], str] = path) -> bool:
            return 200 <= await client.get(path(i)) < 300

        out[name] = await open_loop(rate, max(1, int(rate * seconds)), send, client.target.pid)
    return out


async def bench_http(target: Target, *, runs: int, batches: int, batch: int, concurrency: int, single_rate: float,
                     single_seconds: float, single_streams: int, read_rate: float, read_seconds: float,
                     connections: int, command: str, progress: Progress, server_processes: int = 1,
                     before_reads: Callable[[Target], Awaitable[None]] | None = None) -> dict[str, Any]:
    """Measure ``target``: appends in batches, single events open loop, then (after ``before_reads``) the reads
    open loop; ``runs`` times each."""
    client = Client(target, connections)
    report: dict[str, Any] = {
        "machine": machine(), "command": command, "url": target.url, "runs": runs,
        "client": {"processes": 1, "library": "runledger httpload (asyncio, httptools)", "connections": connections},
        "server": {"pid": target.pid, "started_by_bench": target.pid is not None, "processes": server_processes}}
    try:
        rows = []
        for run in range(runs):
            progress(f"batches, run {run + 1}/{runs}: {batches} requests of {batch} events, {concurrency} in flight")
            rows.append(await _batches(client, run, batches=batches, batch=batch, concurrency=concurrency))
        report["batches"] = {"batch": batch, "batches": batches, "concurrency": concurrency, "per_run": rows,
                             "events_per_s": _spread([r["events_per_s"] for r in rows])}
        rows = []
        for run in range(runs):
            progress(f"single events, run {run + 1}/{runs}: {single_rate:,.0f}/s for {single_seconds:.0f} s, open "
                     "loop")
            rows.append(await _single(client, run, rate=single_rate, seconds=single_seconds, streams=single_streams))
        report["single"] = {"rate": single_rate, "seconds": single_seconds, "per_run": rows,
                            **{k: _spread([r[k] for r in rows]) for k in ("p50_ms", "p99_ms", "max_ms")}}
        if before_reads is not None:
            progress("reads: projecting what was appended and signing a checkpoint ...")
            await before_reads(target)
        per_endpoint: dict[str, list[dict[str, Any]]] = {}
        for run in range(runs):
            progress(f"reads, run {run + 1}/{runs}: each endpoint at {read_rate:,.0f}/s for {read_seconds:.0f} s, "
                     "open loop")
            for name, row in (await _reads(client, rate=read_rate, seconds=read_seconds)).items():
                per_endpoint.setdefault(name, []).append(row)
        report["reads"] = {"rate": read_rate, "seconds": read_seconds, "endpoints": {
            name: {"per_run": rows, **{k: _spread([r[k] for r in rows]) for k in ("p50_ms", "p99_ms", "max_ms")}}
            for name, rows in per_endpoint.items()}}
    finally:
        await client.close()
    return report


def print_report(report: dict[str, Any], out: IO[str]) -> None:
    """The report as tables: median (min-max) over the runs."""
    m = report["machine"]
    print(f"runledger bench-http against {report['url']}: {report['runs']} runs; {m['cpus']} CPUs, "
          f"{m['memory_gib']} GiB, Python {m['python']}; server: {report['server'].get('processes', 1)} serve "
          f"process(es); client: 1 process, httpload, {report['client']['connections']} connections", file=out)

    def cell(s: dict[str, float], unit: str = "") -> str:
        return f"{s['median']:>9,.1f}{unit} ({s['min']:,.1f}-{s['max']:,.1f})"

    b = report["batches"]
    cpu = ", ".join(f"{r['client_cpu_s']:.1f}/{r['server_cpu_s']:.1f}" for r in b["per_run"])
    failed = sum(r["failed"] for r in b["per_run"])
    print(f"\nappend, batches of {b['batch']} ({b['batches']} requests, {b['concurrency']} in flight)", file=out)
    print(f"  events/s  {cell(b['events_per_s'])}   failed {failed}; CPU s client/server per run: {cpu}", file=out)
    s = report["single"]
    failed = sum(r["failed"] for r in s["per_run"])
    lag = max(r["client_lag_max_ms"] for r in s["per_run"])
    print(f"\nappend, one event per request at {s['rate']:,.0f}/s open loop for {s['seconds']:.0f} s (ms from due to "
          "2xx)", file=out)
    print(f"  p50 {cell(s['p50_ms'])}  p99 {cell(s['p99_ms'])}  max {cell(s['max_ms'])}   failed {failed}; client's "
          f"own lag at most {lag:.1f} ms", file=out)
    r = report["reads"]
    print(f"\nreads at {r['rate']:,.0f}/s each, open loop for {r['seconds']:.0f} s (ms from due to 2xx)", file=out)
    print(f"  {'endpoint':<12}{'p50':>28}{'p99':>28}{'max':>28}  failed", file=out)
    for name, e in r["endpoints"].items():
        failed = sum(x["failed"] for x in e["per_run"])
        print(f"  {name:<12}{cell(e['p50_ms']):>28}{cell(e['p99_ms']):>28}{cell(e['max_ms']):>28}  {failed}", file=out)
