"""``runledger bench-verify``: how fast ``runledger verify`` checks the record the stack holds, per second and per
CPU second, the verifier's and the database's.

Each check runs as the command an operator runs (a process of its own, ``--json``), several times; around each
run the verifier's CPU time is read from its rusage and the CPU time of every PostgreSQL and embedded broker
(Tansu) process on this host from ``/proc``: ``verify projection`` moves work into the database and ``verify
log`` into the broker, and a rate per CPU second of the verifier alone would hide it. Measure a quiet stack: a
worker projecting meanwhile counts as the servers'.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import orjson

from runledger.schemas.errors import PermanentError, TransientError

__all__ = ["CHECKS", "bench_verify", "print_report"]

CHECKS: dict[str, tuple[str, ...]] = {
    "chains": ("verify", "chains"),
    "projection": ("verify", "projection"),  # every stream attested by a run before the measured ones
    "projection --full": ("verify", "projection", "--full"),
    "log": ("verify", "log"),  # the log topic, and PostgreSQL against it
    "log --no-database": ("verify", "log", "--no-database"),
}


def bench_verify(checks: list[str], runs: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Run each of ``checks`` (keys of CHECKS) ``runs`` times; the report's figures are per run."""
    report: dict[str, Any] = {"runs": runs, "checks": {}}
    with tempfile.TemporaryDirectory(prefix="runledger-bench-verify-") as scratch:
        attestations = Path(scratch) / "verified.json"
        for name in checks:
            args = [*CHECKS[name], "--json"]
            if name.startswith("projection"):
                args += ["--attestations", str(attestations)]
                if name == "projection":
                    progress("attesting every stream (a run not measured) ...")
                    _run(args)
            results = []
            for n in range(1, runs + 1):
                progress(f"{name}: run {n} of {runs} ...")
                results.append(_measured(args))
            report["checks"][name] = results
    return report


def _run(args: list[str]) -> dict[str, Any]:
    try:
        done = subprocess.run([sys.executable, "-m", "runledger.streams.cli", *args], capture_output=True,
                              timeout=3600)
    except subprocess.TimeoutExpired as e:
        raise TransientError(f"runledger {' '.join(args)} did not end within an hour") from e
    if done.returncode not in (0, 1):
        raise PermanentError(f"runledger {' '.join(args)} failed (exit {done.returncode}): "
                             f"{done.stderr.decode(errors='replace').strip()[-500:]}")
    result: dict[str, Any] = orjson.loads(done.stdout)
    return result


def _measured(args: list[str]) -> dict[str, Any]:
    servers_before, before = _server_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = _run(args)
    seconds = time.perf_counter() - started
    after, servers_after = resource.getrusage(resource.RUSAGE_CHILDREN), _server_cpu()
    verifier = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    postgres, broker = (servers_after[k] - servers_before[k] for k in ("postgres", "broker"))
    events = result["events"]
    return {"events": events, "intact": result["intact"], "derived_events": result.get("derived_events"),
            "seconds": round(seconds, 3), "verifier_cpu_s": round(verifier, 3), "postgres_cpu_s": round(postgres, 3),
            "broker_cpu_s": round(broker, 3), "events_per_s": round(events / seconds),
            "events_per_verifier_cpu_s": round(events / verifier) if verifier else None,
            "events_per_cpu_s": round(events / (verifier + postgres + broker)) if verifier else None}


def _server_cpu() -> dict[str, float]:
    """CPU seconds of every PostgreSQL and every Tansu process on this host (their children's that ended too)."""
    ticks = {"postgres": 0, "broker": 0}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            server = "postgres" if name == "postgres" else "broker" if name.startswith("tansu") else None
            if server is None:
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        ticks[server] += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return {server: count / os.sysconf("SC_CLK_TCK") for server, count in ticks.items()}


def print_report(report: dict[str, Any], out: IO[str]) -> None:
    """One line per check: medians, with the range over the runs."""
    def spread(results: list[dict[str, Any]], key: str) -> str:
        values = [r[key] for r in results if r[key] is not None]
        if not values:
            return "-"
        fmt = "{:,.2f}" if isinstance(values[0], float) else "{:,.0f}"
        low, middle, high = (fmt.format(v) for v in (min(values), statistics.median(values), max(values)))
        return middle if low == high else f"{middle} ({low}-{high})"

    print(f"runledger verify, {report['runs']} runs each: medians (range); CPU of the servers as read on this host "
          "(none if they run elsewhere)", file=out)
    for name, results in report["checks"].items():
        print(f"\n{name}: {spread(results, 'events')} events "
              + (f"({spread(results, 'derived_events')} derived) " if results[0]["derived_events"] is not None
                 else "") + ("intact" if all(r["intact"] for r in results) else "NOT INTACT"), file=out)
        print(f"  {spread(results, 'seconds')} s; {spread(results, 'events_per_s')} events/s", file=out)
        print(f"  CPU s: verifier {spread(results, 'verifier_cpu_s')}, PostgreSQL {spread(results, 'postgres_cpu_s')}, "
              f"broker {spread(results, 'broker_cpu_s')}", file=out)
        print(f"  events per CPU second: verifier {spread(results, 'events_per_verifier_cpu_s')}, verifier and "
              f"servers {spread(results, 'events_per_cpu_s')}", file=out)
