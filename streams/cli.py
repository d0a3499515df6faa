"""The ``runledger`` command line: one subcommand per job, ``--json`` wherever a script may read.

Exit status: 0 done; 1 done, but some input was invalid (``hash``) or an event
was rejected (``wait``); 2 bad input or usage, nothing was done; 3 a service
failed (transient: try again); 4 timed out (``wait``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import IO, Any

import orjson
from tqdm import tqdm

from schemas.chain import compute_hash, canonical
from schemas.errors import RunledgerError
from schemas.events import decode_json, parse_event
from streams import devstack
from streams.producer import Appended, NewEvent, append_many, check_new_events
from streams.settings import Settings

__all__ = ["main"]

EXIT_INVALID, EXIT_USAGE, EXIT_TRANSIENT, EXIT_TIMEOUT = 1, 2, 3, 4


class InputError(RunledgerError):
    """A line of input is not usable; the message names the line and the field."""


def _emit(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, default=str).decode() + "\n")


def _lines(path: str) -> Iterator[tuple[int, str]]:
    stream: IO[str] = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    with stream:
        for number, line in enumerate(stream, start=1):
            if line.strip():
                yield number, line


# dev ------------------------------------------------------------------------------------------

def _cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "up":
        services = devstack.up(settings)
    elif args.action == "down":
        services = devstack.down(settings, purge=args.purge)
    else:
        services = devstack.status(settings)
    for service in services:
        if args.json:
            _emit(service.as_dict())
        else:
            pid = f"pid {service.pid}" if service.pid else ""
            print(f"{service.name:<9} {service.state:<12} {service.url:<52} {pid}")
    return 0


# hash -----------------------------------------------------------------------------------------

def hash_report(line: str) -> dict[str, Any]:
    """The ``runledger hash`` verdict on one line of input."""
    try:
        raw = decode_json(line)
    except RunledgerError as e:
        return {"id": None, "hash": None, "canonical": None, "valid": False, "error": f"{e.code}: {e}"}
    try:
        text: str | None = canonical(raw).decode()
        computed: str | None = compute_hash(raw)
    except (TypeError, ValueError) as e:  # numbers JCS cannot represent
        text = computed = None
        error: str | None = f"invalid_event: {e}"
    else:
        error = None
    if error is None:
        try:
            parse_event(raw)
        except RunledgerError as e:
            error = f"{e.code}: {e}"
    return {"id": raw.get("id"), "hash": computed, "canonical": text, "valid": error is None, "error": error}


def _cmd_hash(args: argparse.Namespace, settings: Settings) -> int:
    invalid = 0
    for _, line in _lines(args.file):
        report = hash_report(line)
        invalid += not report["valid"]
        _emit(report)
    return EXIT_INVALID if invalid else 0


# produce --------------------------------------------------------------------------------------

_PRODUCE_FIELDS = {"stream", "type", "data", "idempotency_key", "time"}


def read_produce_input(lines: Iterator[tuple[int, str]]) -> list[tuple[str, NewEvent]]:
    """Parse and validate every line first: one bad line and nothing is published."""
    out = []
    for number, line in lines:
        try:
            obj = decode_json(line)
            unknown = sorted(set(obj) - _PRODUCE_FIELDS)
            if unknown:
                raise InputError(f"{unknown[0]}: unknown field; a line has {', '.join(sorted(_PRODUCE_FIELDS))}")
            for required in ("stream", "type", "data"):
                if required not in obj:
                    raise InputError(f"{required}: missing")
            at = obj.get("time")
            event = NewEvent(obj["type"], obj["data"], obj.get("idempotency_key"),
                             datetime.fromisoformat(at) if isinstance(at, str) else None)
            check_new_events(obj["stream"], [event])
        except (RunledgerError, ValueError) as e:
            raise InputError(f"line {number}: {e}") from None
        out.append((obj["stream"], event))
    return out


def _cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    items = read_produce_input(_lines(args.file))
    started = time.monotonic()

    def show(appended: Appended) -> None:
        _emit({"stream": appended.stream_id, "seq": appended.seq, "id": appended.id, "hash": appended.hash,
               "duplicate": appended.duplicate})

    streams = asyncio.run(append_many(settings, items, on_appended=show if args.json else None,
                                      progress=not args.quiet))
    elapsed = time.monotonic() - started
    print(f"appended {len(items)} events to {streams} streams in {elapsed:.2f} s "
          f"({len(items) / max(elapsed, 1e-9):,.0f} events/s) on topic {settings.events_topic}", file=sys.stderr)
    return 0


# db, worker ------------------------------------------------------------------------------------

def _cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from projections.store import migrate

    applied = asyncio.run(migrate(settings.database_url, settings.db_schema))
    print(f"schema {settings.db_schema}: " + (f"applied {', '.join(applied)}" if applied else "up to date"))
    return 0


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.app import create_app
    from streams.topics import ensure_topics, worker_topics

    # Before Faust starts: a worker may start before any producer, and the retry topics need the
    # log's partition count and infinite retention, not Faust's defaults.
    asyncio.run(ensure_topics(settings.kafka_bootstrap_servers, worker_topics(settings)))
    app = create_app(settings)
    worker = app.Worker(loglevel=args.loglevel, quiet=True)
    worker.execute_from_commandline()
    return 0


# wait -----------------------------------------------------------------------------------------

def _cmd_wait(args: argparse.Namespace, settings: Settings) -> int:
    from projections.wait import wait_projected

    result = asyncio.run(wait_projected(settings.database_url, settings.db_schema, args.stream, args.seq,
                                        event_id=args.id, timeout=args.timeout))
    if args.json:
        _emit(result.as_dict())
    elif result.status == "projected":
        print(f"projected: {result.stream_id} seq {result.seq} (event {result.event_id}, hash {result.hash}) "
              f"after {result.waited_s:.3f} s")
    elif result.status == "rejected":
        print(f"rejected: {result.stream_id} seq {result.seq} (event {result.event_id}): "
              f"{result.reason}: {result.error} (see `runledger dlq show {result.dead_letter_id}`)")
    else:
        print(f"timed out after {result.waited_s:.1f} s: {result.stream_id} seq {result.seq} is {result.error}")
    return {"projected": 0, "rejected": EXIT_INVALID}.get(result.status, EXIT_TIMEOUT)


# rebuild --------------------------------------------------------------------------------------

def _cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from streams.rebuild import rebuild

    bar = tqdm(unit="ev", desc="re-projecting", disable=True if args.json else None, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    report = asyncio.run(rebuild(settings, force=args.force, switch=not args.no_switch, progress=progress))
    bar.close()
    if args.json:
        _emit(report.as_dict())
    else:
        print(f"re-projected {report.records:,} records of {settings.events_topic} into {report.rebuilt_schema} "
              f"in {report.seconds:.1f} s\n")
        print(f"{'table':<14}{'live rows':>11}{'rebuilt rows':>14}  {'live md5':<34}{'rebuilt md5':<34}")
        for table, ((live_rows, live_md5), (new_rows, new_md5)) in report.checksums.items():
            mark = "equal" if (live_rows, live_md5) == (new_rows, new_md5) else "DIFFERENT"
            print(f"{table:<14}{live_rows:>11,}{new_rows:>14,}  {live_md5:<34}{new_md5:<34}{mark}")
        if report.switched:
            print(f"\nswitched: {report.live_schema} now holds the rebuilt tables; the previous ones are kept in "
                  f"{report.retired_schema} (DROP SCHEMA {report.retired_schema} CASCADE when no longer needed)")
        else:
            why = "as asked (--no-switch)" if args.no_switch else "because the tables differ (--force to switch)"
            print(f"\nnot switched {why}: the rebuilt tables are in {report.rebuilt_schema}")
    return 0 if report.switched or (args.no_switch and report.equal) else EXIT_INVALID


# bench ----------------------------------------------------------------------------------------

def _cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from streams.bench import run_bench

    results = asyncio.run(run_bench(settings, args.events, worker=not args.no_worker,
                                    progress=lambda text: print(text, file=sys.stderr)))
    baseline = next(m.rate for m in results if m.name.startswith("baseline"))
    for m in results:
        if args.json:
            _emit({"name": m.name, "events": m.events, "seconds": round(m.seconds, 3),
                   "events_per_s": round(m.rate), "vs_baseline": round(m.rate / baseline, 3)})
        else:
            print(f"{m.name:<38}{m.events:>9,} events {m.seconds:>8.2f} s {m.rate:>10,.0f} events/s "
                  f"{m.rate / baseline:>7.1%} of baseline")
    return 0


# demo (the main job) ----------------------------------------------------------------------------

def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from streams.demo import run_demo

    summary = run_demo(settings, args.executions, seed=args.seed, timeout=args.timeout)
    return EXIT_INVALID if summary.broken_chains else 0


# wiring ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runledger",
        description="runledger: a hash-chained, event-sourced record of AI-agent workflow runs. "
        "Configuration comes from RUNLEDGER_* environment variables (see README).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = sub.add_parser("dev", help="start, stop or inspect the embedded stack (PostgreSQL, Kafka, Redis)",
                         description="The embedded stack for laptops and tests. State lives in "
                         "RUNLEDGER_STATE_DIR (default .runledger/). Services left out of "
                         "RUNLEDGER_EMBEDDED are external and never touched.")
    dev_sub = dev.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in [("up", "start what is not running yet (idempotent)"),
                         ("down", "stop what `up` started, nothing else"),
                         ("status", "show each service's state and URL")]:
        p = dev_sub.add_parser(action, help=text, description=text)
        p.add_argument("--json", action="store_true", help="one JSON object per service")
        if action == "down":
            p.add_argument("--purge", action="store_true", help="also delete the stored data")
    dev.set_defaults(func=_cmd_dev)

    hsh = sub.add_parser("hash", help="show the canonical form and hash of events, to debug a producer",
                         description="Reads events (one JSON object a line) and prints for each a JSON line "
                         '{"id", "hash" (computed), "canonical" (the JCS text that is hashed), "valid", "error"}. '
                         "Exit status 1 if any event is invalid.")
    hsh.add_argument("file", nargs="?", default="-", help="file of events (default: stdin)")
    hsh.set_defaults(func=_cmd_hash)

    prod = sub.add_parser("produce", help="append events read as JSON lines",
                          description='Reads {"stream", "type", "data"} objects (optional "idempotency_key", '
                          '"time"), one a line, validates all of them, then appends them in order per stream. '
                          "One invalid line and nothing is published.")
    prod.add_argument("file", nargs="?", default="-", help="file of events (default: stdin)")
    prod.add_argument("--json", action="store_true", help="print each appended event as a JSON line")
    prod.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    prod.set_defaults(func=_cmd_produce)

    db = sub.add_parser("db", help="database administration",
                        description="Database administration of the projection schema (RUNLEDGER_DB_SCHEMA).")
    db_sub = db.add_subparsers(dest="action", required=True, metavar="ACTION")
    db_sub.add_parser("migrate", help="apply the migrations in sql/migrations that the schema lacks (idempotent, "
                      "safe from several processes at once)")
    db.set_defaults(func=_cmd_db)

    worker = sub.add_parser("worker", help="run a projection worker (Faust); several share the log's partitions",
                            description="Consumes <prefix>.events in batches and projects every event into "
                            "PostgreSQL, one transaction per batch, offsets stored with the rows. Run several "
                            "with the same RUNLEDGER_CONSUMER_GROUP to share the partitions. Stop with Ctrl-C.")
    worker.add_argument("--loglevel", default="warning", choices=["debug", "info", "warning", "error"])
    worker.set_defaults(func=_cmd_worker)

    wait = sub.add_parser("wait", help="wait until an event is projected (read-your-writes)",
                          description="Returns once event SEQ of STREAM is projected into the tables, or says why "
                          "it is not: rejected (with the reason) or timed out (with what it waits for). Exit "
                          "status 0 projected, 1 rejected, 4 timed out, 3 PostgreSQL unreachable.")
    wait.add_argument("stream", help="the stream id (the event's subject)")
    wait.add_argument("seq", type=int, help="the event's seq")
    wait.add_argument("--id", help="the event id: only this event counts (another event at the same seq "
                      "does not end the wait)")
    wait.add_argument("--timeout", type=float, default=30.0, metavar="S", help="give up after S seconds (default 30)")
    wait.add_argument("--json", action="store_true", help="print the result as one JSON object")
    wait.set_defaults(func=_cmd_wait)

    rebuild = sub.add_parser(
        "rebuild", help="re-project the whole log into new tables, compare, and switch over",
        description="Re-projects the log from offset 0 into a new schema <schema>_rebuild_<time> while the live "
        "tables keep serving, follows the live workers until caught up, then, with the workers paused between "
        "two batches, compares a checksum per table and, if all are equal, switches: the live schema is renamed "
        "<schema>_retired_<time> (kept) and the rebuilt one takes its name. Workers continue in the rebuilt "
        "tables without a restart. Exit status 0 switched (or equal, with --no-switch), 1 tables differ.")
    rebuild.add_argument("--no-switch", action="store_true", help="build and compare only; keep the rebuilt schema")
    rebuild.add_argument("--force", action="store_true",
                         help="switch even if tables differ (after a deliberate change of the projection rules)")
    rebuild.add_argument("--json", action="store_true", help="print the report as one JSON object, no progress bar")
    rebuild.set_defaults(func=_cmd_rebuild)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
        return int(args.func(args, settings))
    except RunledgerError as e:
        print(f"runledger {args.command}: {e}", file=sys.stderr)
        return EXIT_TRANSIENT if e.transient else EXIT_USAGE
    except (OSError, ValueError) as e:
        print(f"runledger {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"runledger {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
