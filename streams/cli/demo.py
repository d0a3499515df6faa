"""``runledger bench`` and ``runledger demo``: a simulated fleet's events through the running stack, measured
against a plain baseline or end to end (the main job)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from runledger.streams.cli.common import EXIT_INVALID, Subparsers, emit
from runledger.streams.settings import Settings

__all__ = ["register"]


def register(sub: Subparsers) -> None:
    bench = sub.add_parser("bench", help="measure projection throughput against plain aiokafka + COPY",
                           description="Publishes about N simulated events to a fresh topic, then measures: a "
                           "plain aiokafka consumer COPYing raw records into PostgreSQL (the baseline), the same "
                           "loop through runledger's batch projection, and a real `runledger worker` process "
                           "(from its first projected event to its last). Uses the running stack; cleans up "
                           "its schemas.")
    bench.add_argument("--events", type=int, default=100_000, help="about how many events (default 100000)")
    bench.add_argument("--no-worker", action="store_true", help="skip the worker process measurement")
    bench.add_argument("--json", action="store_true", help="one JSON object per measurement")
    bench.set_defaults(func=_cmd_bench)

    demo = sub.add_parser("demo", help="the main job: the embedded stack, a worker and a simulated fleet, end to end",
                          description="Starts the embedded stack (if not running) and a projection worker, appends "
                          "the events of a simulated fleet of agents (several workflows, retries, failures, "
                          "cancellations, timeouts, costs over several models, some unpriced), waits until "
                          "every event is projected, then prints executions by status, spend by model and by "
                          "workflow, the most expensive executions, and how many chains were checked intact. "
                          "The stack keeps running afterwards (`runledger dev down` stops it). Exit status 1 "
                          "if a chain is broken.")
    demo.add_argument("--executions", type=int, default=300, help="how many executions (default 300)")
    demo.add_argument("--seed", type=int, default=7, help="random seed of the simulation (default 7)")
    demo.add_argument("--timeout", type=float, default=300.0, metavar="S",
                      help="give up if not all is projected after S seconds (default 300)")
    demo.set_defaults(func=_cmd_demo)


def _cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.dev.bench import run_bench

    results = asyncio.run(run_bench(settings, args.events, worker=not args.no_worker,
                                    progress=lambda text: print(text, file=sys.stderr)))
    baseline = next(m.rate for m in results if m.name.startswith("baseline"))
    for m in results:
        if args.json:
            emit({"name": m.name, "events": m.events, "seconds": round(m.seconds, 3),
                  "events_per_s": round(m.rate), "vs_baseline": round(m.rate / baseline, 3)})
        else:
            print(f"{m.name:<38}{m.events:>9,} events {m.seconds:>8.2f} s {m.rate:>10,.0f} events/s "
                  f"{m.rate / baseline:>7.1%} of baseline")
    return 0


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.dev.demo import run_demo

    summary = run_demo(settings, args.executions, seed=args.seed, timeout=args.timeout)
    return EXIT_INVALID if summary.broken_chains else 0
