"""``runledger bench``: throughput against the raw floor, lock waits, latency at fixed rates, memory over a long run.

``run_bench`` measures what is asked (``benchpaths.py`` has the paths, ``benchlocks.py`` the workers' lock
waits, ``benchlatency.py`` latency and memory) and returns one report: printed as a table, written as JSON,
drawn as a PNG (``benchchart.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import orjson

from runledger.streams.dev.benchlatency import latency, memory
from runledger.streams.dev.benchpaths import BenchRun, Progress, machine
from runledger.streams.dev.workload import Workload
from runledger.streams.settings import Settings

__all__ = ["run_bench", "print_report", "write_report"]


async def run_bench(settings: Settings, *, events: int, rounds: int, workers: tuple[int, ...],
                    rates: tuple[float, ...], rate_seconds: float, long_events: int, command: str,
                    progress: Progress, lock_every: float = 0.1) -> dict[str, Any]:
    """Measure throughput (``rounds`` rounds of every path, the workers' lock waits sampled every ``lock_every``
    seconds), then, with ``workers``, latency at each of ``rates`` and, with ``long_events``, one worker's memory
    over that many events."""
    run = BenchRun(settings, progress)
    report: dict[str, Any] = {"machine": machine(), "command": command}
    try:
        progress(f"building about {events:,} events ...")
        workload = Workload(events, run_tag=run.settings.topic_prefix)
        report["throughput"] = await run.throughput(workload, rounds, workers, lock_every=lock_every)
        del workload  # published: the latency and memory runs build their own
        if workers:
            report["latency"] = []
            for rate in rates:
                progress(f"latency: {rate:,.0f} events/s for {rate_seconds:.0f} s, one worker ...")
                report["latency"].append(await latency(run, rate, rate_seconds))
        if workers and long_events:
            report["memory"] = await memory(run, long_events)
    finally:
        await run.close()
    return report


def print_report(report: dict[str, Any], out: IO[str]) -> None:
    """The report as tables: events/s per path (median, min, max, share of the floor), latency, memory."""
    t = report["throughput"]
    m = report["machine"]
    print(f"{t['events']:,} events of {t['executions']:,} executions, interleaved; {t['rounds']} rounds; "
          f"{m['cpus']} CPUs, {m['memory_gib']} GiB, Python {m['python']}", file=out)
    print(f"{'path':<12}{'median/s':>10}{'min/s':>10}{'max/s':>10}   share of floor (median, min-max)", file=out)
    for name, s in t["events_per_s"].items():
        share = t["share_of_floor"].get(name)
        shown = f"   {share['median']:6.1%} ({share['min']:.1%}-{share['max']:.1%})" if share else ""
        print(f"{name:<12}{s['median']:>10,.0f}{s['min']:>10,.0f}{s['max']:>10,.0f}{shown}", file=out)
    _print_locks(t.get("lock_wait", {}), out)
    for row in report.get("latency", []):
        print(f"latency at {row['rate']:>6,.0f} events/s: p50 {row['p50_ms']:>7.1f} ms, p99 {row['p99_ms']:>7.1f} ms, "
              f"max {row['max_ms']:>7.1f} ms ({row['events']:,} events)", file=out)
    if mem := report.get("memory"):
        print(f"memory over {mem['events']:,} events: RSS {mem['start_mib']} MiB at 5 %, {mem['end_mib']} MiB at "
              f"the end, max {mem['max_mib']} MiB, growth {mem['growth_mib']} MiB", file=out)


def _print_locks(paths: dict[str, Any], out: IO[str]) -> None:
    """Per worker path: the share of its transactions' time spent waiting for a lock, the waits by event, and
    the statement waited in most."""
    if not paths:
        return
    every = next((r["every_s"] for p in paths.values() for r in p["per_round"]), 0.1)
    print(f"lock waits: share of the workers' samples in a transaction that wait for a lock (pg_stat_activity "
          f"every {every * 1000:.0f} ms)", file=out)
    print(f"{'path':<12}{'median':>8}{'min':>8}{'max':>8}{'in xact':>9}{'waiting':>9}{'held by a worker':>18}   "
          "by wait event", file=out)
    for name, p in paths.items():
        shares = (f"{p['median']:>8.1%}{p['min']:>8.1%}{p['max']:>8.1%}" if p["median"] is not None
                  else f"{'-':>8}{'-':>8}{'-':>8}")
        events = ", ".join(f"{event} {n:,}" for event, n in p["by_event"].items()) or "-"
        print(f"{name:<12}{shares}{p['in_transaction']:>9,}{p['waiting']:>9,}{p['blocked_by_worker']:>18,}   "
              f"{events}", file=out)
    for name, p in paths.items():
        if top := p["top_statement"]:
            print(f"  {name} waited most in ({top['samples']:,} samples): {top['query'][:100]}", file=out)
        if p["failed_ticks"]:
            print(f"  {name}: {p['failed_ticks']:,} sample(s) failed: {'; '.join(p['errors'])}", file=out)


def write_report(report: dict[str, Any], directory: Path) -> list[Path]:
    """``bench.json`` and ``bench.png`` in ``directory``."""
    from runledger.streams.dev.benchchart import draw

    directory.mkdir(parents=True, exist_ok=True)
    json_path, png_path = directory / "bench.json", directory / "bench.png"
    json_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    draw(report, png_path)
    return [json_path, png_path]
