"""``runledger bench`` and ``runledger demo``: a simulated fleet's events through the running stack, measured
against a plain baseline or end to end (the main job); ``runledger bench-verify``: how fast the record is verified;
``runledger bench-log``: whether the log stays fast as it grows; ``runledger bench-http``: what one ``serve`` takes;
``runledger bench-webhooks``: what one delivery worker sends."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from runledger.streams.cli.common import EXIT_INVALID, EXIT_USAGE, Subparsers, emit
from runledger.streams.settings import Settings

__all__ = ["register"]


def register(sub: Subparsers) -> None:
    bench = sub.add_parser("bench", help="measure throughput against the raw floor, lock waits, latency and memory",
                           description="Builds an interleaved workload (a simulated fleet, hundreds of executions "
                           "under way at once, every event type), publishes it to fresh topics, and measures, "
                           "ROUNDS times each: the floor (plain aiokafka reading and COPYing the raw records into "
                           "PostgreSQL), the store (the same loop through runledger's batch projection, no Faust) "
                           "and real `runledger worker` processes (1 and 2, from the first batch committed to "
                           "the last), and for the workers the share of their transactions' time spent waiting for a "
                           "lock (pg_stat_activity sampled every LOCK_EVERY ms: by wait event, and the statement "
                           "waited in most). Then the p50/p99 latency from event time to commit with one worker at "
                           "each of RATES, and with --long one worker's memory over that many events. Prints "
                           "median, min and max per path and each path's share of the floor. Uses the running "
                           "stack; drops its schemas afterwards.")
    bench.add_argument("--events", type=int, default=100_000, help="about how many events (default 100000)")
    bench.add_argument("--rounds", type=int, default=3, help="rounds of every throughput path (default 3)")
    bench.add_argument("--workers", type=_counts, default=(1, 2), metavar="N,N",
                       help="worker processes to measure (default 1,2)")
    bench.add_argument("--rates", type=_counts, default=(500, 2000, 5000), metavar="R,R",
                       help="produce rates for the latency runs, events/s (default 500,2000,5000)")
    bench.add_argument("--rate-seconds", type=float, default=10.0, metavar="S",
                       help="how long each latency run sends (default 10)")
    bench.add_argument("--long", type=int, default=0, metavar="N",
                       help="also run one worker over N events and report its memory (RSS); 1000000 for the "
                       "issue's target (default: skip)")
    bench.add_argument("--lock-every", type=_milliseconds, default=100, metavar="MS",
                       help="sample the workers' lock waits every MS milliseconds (default 100)")
    bench.add_argument("--no-worker", action="store_true",
                       help="floor and store only: no worker processes, no latency, no memory")
    bench.add_argument("--json", action="store_true", help="print the report as one JSON object")
    bench.add_argument("--out", type=Path, metavar="DIR", help="also write DIR/bench.json and DIR/bench.png")
    bench.set_defaults(func=_cmd_bench)

    bench_verify = sub.add_parser(
        "bench-verify", help="measure how fast `runledger verify` checks the record the stack holds",
        description="Runs each check as its own `runledger verify ... --json` process RUNS times over what the "
        "stack holds now (run `runledger demo --executions 20000` first for a sizeable record) and prints, per "
        "check, the events checked, seconds, events per second, and events per CPU second of the verifier and of "
        "the verifier and the servers together (the CPU of PostgreSQL and of the embedded broker is read from "
        "/proc when they run on this host). "
        "`projection` is measured with every stream attested by a run before (the hourly case); `projection "
        "--full` derives every stream. Measure a quiet stack: a worker projecting meanwhile counts as the servers'.")
    bench_verify.add_argument("--runs", type=int, default=5, help="runs of each check (default 5)")
    bench_verify.add_argument("--checks", type=_checks, default=None, metavar="C,C",
                              help="which checks: chains, projection, projection --full, log, log --no-database "
                              "(default: all)")
    bench_verify.add_argument("--json", action="store_true", help="print the report as one JSON object")
    bench_verify.set_defaults(func=_cmd_bench_verify)

    bench_log = sub.add_parser(
        "bench-log", help="measure whether the log stays fast as it grows: produce and consume rates per slice",
        description="Produces RECORDS records to a fresh topic of the running stack's broker (acks=all, BATCH sends "
        "in flight at a time), reads them all back from the start, and prints the produce and consume rates of "
        "every SLICE records, their median, min and max, and the last slices against the first. With the embedded "
        "durable log it also prints how many objects each partition is kept in. The topic is deleted afterwards "
        "unless --keep.")
    bench_log.add_argument("--records", type=int, default=1_000_000, help="how many records (default 1000000)")
    bench_log.add_argument("--slice", type=int, default=100_000, help="records per slice (default 100000)")
    bench_log.add_argument("--partitions", type=int, default=8, help="partitions of the topic (default 8)")
    bench_log.add_argument("--keys", type=int, default=500, help="distinct record keys (default 500)")
    bench_log.add_argument("--batch", type=int, default=128, help="sends in flight at a time (default 128)")
    bench_log.add_argument("--value-bytes", type=int, default=600, help="bytes per record value (default 600)")
    bench_log.add_argument("--keep", action="store_true", help="keep the topic afterwards")
    bench_log.add_argument("--json", action="store_true", help="print the report as one JSON object")
    bench_log.set_defaults(func=_cmd_bench_log)

    bench_http = sub.add_parser(
        "bench-http", help="measure one `runledger serve` process with signed requests: appends and reads",
        description="Starts `runledger serve` (one process) on a free port of the running stack, with a schema, "
        "topics, sources "
        "key and source of its own (dropped afterwards), or targets --url, and measures with signed requests (one "
        "client process, keep-alive connections of its own), RUNS times each: events/s appended in batches of BATCH "
        "(CONCURRENCY requests in flight, each batch a new stream); one-event requests at SINGLE_RATE/s, open loop "
        "(each request is due at its scheduled time and its latency counts from then to its 2xx, so queueing is not "
        "hidden); then, once a worker has projected the streams and a checkpoint is signed, each read endpoint at "
        "READ_RATE/s, open loop. Prints the median, min and max over the runs, and the CPU seconds of the client and "
        "the server (a figure limited by the client shows as the client's CPU).")
    bench_http.add_argument("--runs", type=int, default=3, help="runs of each measurement (default 3)")
    bench_http.add_argument("--batches", type=int, default=100, help="requests per batch run (default 100)")
    bench_http.add_argument("--batch", type=int, default=100, help="events per batch request (default 100)")
    bench_http.add_argument("--concurrency", type=int, default=8, help="batch requests in flight (default 8)")
    bench_http.add_argument("--single-rate", type=float, default=500.0, metavar="R",
                            help="one-event requests a second (default 500)")
    bench_http.add_argument("--single-seconds", type=float, default=10.0, metavar="S", help="for S s (default 10)")
    bench_http.add_argument("--single-streams", type=int, default=50, metavar="N",
                            help="round robin over N streams (default 50)")
    bench_http.add_argument("--read-rate", type=float, default=200.0, metavar="R",
                            help="requests a second to each read endpoint (default 200)")
    bench_http.add_argument("--read-seconds", type=float, default=5.0, metavar="S",
                            help="for S s per endpoint (default 5)")
    bench_http.add_argument("--connections", type=int, default=64, help="the client's pool (default 64)")
    bench_http.add_argument("--serve-workers", type=int, default=1, metavar="N",
                            help="serve's --workers: processes of the serve it starts (default 1)")
    bench_http.add_argument("--url", help="measure this running serve instead of starting one (with --source and "
                            "--secret-file: a source granted every stream; the reads read what it holds)")
    bench_http.add_argument("--source", help="with --url: the source id to sign as")
    bench_http.add_argument("--secret-file", type=Path, help="with --url: a file holding the source's whsec_ secret")
    bench_http.add_argument("--json", action="store_true", help="print the report as one JSON object")
    bench_http.set_defaults(func=_cmd_bench_http)

    bench_hooks = sub.add_parser(
        "bench-webhooks", help="measure one webhook delivery worker sending to a local receiver",
        description="On the running stack, with a schema of its own (dropped afterwards) and a receiver in this "
        "process (204 at once): RUNS times, EVENTS events over STREAMS streams are written to the log, then one "
        "`runledger webhooks worker` starts and the deliveries per second from the first to the last are counted; "
        "then RUNS times, with a worker running, events are written at RATE/s for SECONDS s (open loop) and each "
        "delivery's latency from the event's time to the receiver is measured (p50, p99, max). Prints the median, "
        "min and max over the runs, and the worker's CPU seconds.")
    bench_hooks.add_argument("--runs", type=int, default=3, help="runs of each measurement (default 3)")
    bench_hooks.add_argument("--events", type=int, default=20_000, help="events per throughput run (default 20000)")
    bench_hooks.add_argument("--streams", type=int, default=200, help="streams they are spread over (default 200)")
    bench_hooks.add_argument("--rate", type=float, default=500.0, help="events a second in a latency run "
                             "(default 500)")
    bench_hooks.add_argument("--seconds", type=float, default=10.0, help="length of a latency run (default 10)")
    bench_hooks.add_argument("--latency-streams", type=int, default=50, metavar="N",
                             help="round robin over N streams in a latency run (default 50)")
    bench_hooks.add_argument("--json", action="store_true", help="print the report as one JSON object")
    bench_hooks.set_defaults(func=_cmd_bench_webhooks)

    dashboards = sub.add_parser(
        "dashboards", help="generate the Grafana dashboards (ops/grafana/dashboards) from their code",
        description="Writes runledger's Grafana dashboards, built with grafana-foundation-sdk in "
        "streams/dev/dashboards.py, as JSON files that Grafana's provisioning loads (compose.yaml). --check "
        "writes nothing and exits 1 if the files differ from what the code builds.")
    dashboards.add_argument("--out", type=Path, metavar="DIR", help="where (default: ops/grafana/dashboards)")
    dashboards.add_argument("--check", action="store_true", help="compare only; exit 1 if a file is stale")
    dashboards.set_defaults(func=_cmd_dashboards)

    demo = sub.add_parser("demo", help="the main job: the embedded stack, a worker and a simulated fleet, end to end",
                          description="Starts the embedded stack (if not running) and a projection worker, appends "
                          "the events of a simulated fleet of agents (several workflows, retries, failures, "
                          "cancellations, timeouts, costs over several models, some unpriced), waits until "
                          "every event is projected (a share of the executions, HTTP_SHARE, is appended over HTTP "
                          "through `runledger serve` with signed requests), then prints executions by status, "
                          "spend by model and by workflow, the most expensive executions, and how many chains were "
                          "checked intact. The stack keeps running afterwards (`runledger dev down` stops it). "
                          "Exit status 1 if a chain is broken.")
    demo.add_argument("--executions", type=int, default=300, help="how many executions (default 300)")
    demo.add_argument("--seed", type=int, default=7, help="random seed of the simulation (default 7)")
    demo.add_argument("--http-share", type=float, default=0.25, metavar="F",
                      help="the share of executions appended over HTTP through `runledger serve` with signed "
                      "requests, the rest through EventProducer (default 0.25; 0: none)")
    demo.add_argument("--timeout", type=float, default=300.0, metavar="S",
                      help="give up if not all is projected after S seconds (default 300)")
    demo.set_defaults(func=_cmd_demo)


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every number must be at least 1")
    return values


def _milliseconds(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of milliseconds, at least 1")
    return int(text)


def _cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.dev.bench import print_report, run_bench, write_report

    report = asyncio.run(run_bench(
        settings, events=args.events, rounds=args.rounds, workers=() if args.no_worker else args.workers,
        rates=tuple(float(r) for r in args.rates), rate_seconds=args.rate_seconds, long_events=args.long,
        lock_every=args.lock_every / 1000,
        command=" ".join(["runledger", *sys.argv[1:]]), progress=lambda text: print(text, file=sys.stderr)))
    if args.out is not None:
        for path in write_report(report, args.out):
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        emit(report)
    else:
        print_report(report, sys.stdout)
    return 0


def _cmd_bench_log(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.dev.benchlog import bench_log, print_report

    if min(args.records, args.slice, args.partitions, args.keys, args.batch, args.value_bytes) < 1:
        print("runledger bench-log: every number must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    report = asyncio.run(bench_log(settings, records=args.records, slice_size=args.slice, partitions=args.partitions,
                                   keys=args.keys, batch=args.batch, value_bytes=args.value_bytes, keep=args.keep,
                                   progress=lambda text: print(text, file=sys.stderr)))
    if args.json:
        emit(report)
    else:
        print_report(report, sys.stdout)
    return 0


def _cmd_bench_http(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.dev.benchhttp import Target, bench_http, print_report
    from runledger.streams.dev.benchserve import own_serve

    numbers = (args.runs, args.batches, args.batch, args.concurrency, args.single_rate, args.single_seconds,
               args.single_streams, args.read_rate, args.read_seconds, args.connections, args.serve_workers)
    if min(numbers) <= 0:
        print("runledger bench-http: every number must be above 0", file=sys.stderr)
        return EXIT_USAGE
    if args.url and not (args.source and args.secret_file):
        print("runledger bench-http: --url needs --source and --secret-file", file=sys.stderr)
        return EXIT_USAGE

    def progress(text: str) -> None:
        print(text, file=sys.stderr)

    options = {"runs": args.runs, "batches": args.batches, "batch": args.batch, "concurrency": args.concurrency,
               "single_rate": args.single_rate, "single_seconds": args.single_seconds,
               "single_streams": args.single_streams, "read_rate": args.read_rate,
               "read_seconds": args.read_seconds, "connections": args.connections,
               "server_processes": args.serve_workers,
               "command": " ".join(["runledger", *sys.argv[1:]]), "progress": progress}

    async def run() -> dict[str, Any]:
        if args.url:
            target = Target(args.url.rstrip("/"), args.source, args.secret_file.read_text().strip())
            return await bench_http(target, **options)
        async with own_serve(settings, progress, workers=args.serve_workers) as (target, ready_reads):
            return await bench_http(target, before_reads=ready_reads, **options)

    report = asyncio.run(run())
    if args.json:
        emit(report)
    else:
        print_report(report, sys.stdout)
    return 0


def _cmd_bench_webhooks(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.dev.benchwebhooks import bench_webhooks, print_report

    if min(args.runs, args.events, args.streams, args.rate, args.seconds, args.latency_streams) <= 0:
        print("runledger bench-webhooks: every number must be above 0", file=sys.stderr)
        return EXIT_USAGE
    report = asyncio.run(bench_webhooks(
        settings, runs=args.runs, events=args.events, streams=args.streams, rate=args.rate, seconds=args.seconds,
        latency_streams=args.latency_streams, command=" ".join(["runledger", *sys.argv[1:]]),
        progress=lambda text: print(text, file=sys.stderr)))
    if args.json:
        emit(report)
    else:
        print_report(report, sys.stdout)
    return 0


def _checks(text: str) -> list[str]:
    from runledger.streams.dev.benchverify import CHECKS

    checks = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown or not checks:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more of {', '.join(CHECKS)}")
    return checks


def _cmd_bench_verify(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.dev.benchverify import CHECKS, bench_verify, print_report

    if args.runs < 1:
        print("runledger bench-verify: --runs must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    report = bench_verify(args.checks or list(CHECKS), args.runs,
                          progress=lambda text: print(text, file=sys.stderr))
    if args.json:
        emit(report)
    else:
        print_report(report, sys.stdout)
    return 0


def _cmd_dashboards(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from runledger.streams.dev.dashboards import DASHBOARDS_DIR, build, write
    except ImportError as e:
        print(f"runledger dashboards needs the dev extras (pip install -e '.[dev]'): {e}", file=sys.stderr)
        return EXIT_USAGE
    out = args.out or DASHBOARDS_DIR
    if args.check:
        stale = [name for name, model in build().items()
                 if not (out / name).exists() or json.loads((out / name).read_text()) != model]
        for name in stale:
            print(f"{out / name} is not what streams/dev/dashboards.py builds: run `runledger dashboards`")
        return EXIT_INVALID if stale else 0
    for path in write(out):
        print(f"wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.dev.demo import run_demo

    if not 0 <= args.http_share <= 1:
        print("runledger demo: --http-share must be between 0 and 1", file=sys.stderr)
        return EXIT_USAGE
    intact = run_demo(settings, args.executions, seed=args.seed, timeout=args.timeout, http_share=args.http_share)
    return 0 if intact else EXIT_INVALID
