"""The ``runledger`` command line: one subcommand per job, ``--json`` wherever a script may read.

Exit status: 0 done; 1 done, but some input was invalid (``hash``); 2 bad input
or usage, nothing was done; 3 a service failed (transient: try again).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson
from tqdm import tqdm

from schemas.chain import compute_hash, canonical
from schemas.errors import RunledgerError
from schemas.events import decode_json, parse_event
from streams import devstack
from streams.producer import EventProducer, NewEvent, check_new_events
from streams.settings import Settings

__all__ = ["main"]

EXIT_INVALID, EXIT_USAGE, EXIT_TRANSIENT = 1, 2, 3


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


def _batches(events: list[NewEvent], size: int = 1000) -> Iterator[list[NewEvent]]:
    """Consecutive batches of at most ``size``; a repeated idempotency key starts a new batch,
    so that the repeat is answered as a duplicate of the first."""
    batch: list[NewEvent] = []
    keys: set[str] = set()
    for event in events:
        if len(batch) >= size or (event.idempotency_key is not None and event.idempotency_key in keys):
            yield batch
            batch, keys = [], set()
        batch.append(event)
        if event.idempotency_key is not None:
            keys.add(event.idempotency_key)
    if batch:
        yield batch


async def produce(settings: Settings, items: Sequence[tuple[str, NewEvent]], *, json_lines: bool = False,
                  progress: bool = True, concurrency: int = 16) -> int:
    """Append ``items`` (stream id, event) in input order per stream, streams concurrently."""
    by_stream: dict[str, list[NewEvent]] = {}
    for stream_id, event in items:
        by_stream.setdefault(stream_id, []).append(event)
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(items), unit="ev", desc="appending", disable=None if progress else True, file=sys.stderr)
    async with EventProducer(settings) as producer:
        async def one(stream_id: str, events: list[NewEvent]) -> None:
            async with gate:
                for batch in _batches(events):
                    for appended in await producer.append_batch(stream_id, batch):
                        if json_lines:
                            _emit({"stream": stream_id, "seq": appended.seq, "id": appended.id,
                                   "hash": appended.hash, "duplicate": appended.duplicate})
                    bar.update(len(batch))
        await asyncio.gather(*(one(s, e) for s, e in by_stream.items()))
    bar.close()
    return len(by_stream)


def _cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    items = read_produce_input(_lines(args.file))
    started = time.monotonic()
    streams = asyncio.run(produce(settings, items, json_lines=args.json, progress=not args.quiet))
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

    app = create_app(settings)
    worker = app.Worker(loglevel=args.loglevel, quiet=True)
    worker.execute_from_commandline()
    return 0


# demo (the main job) ----------------------------------------------------------------------------

def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from streams.fleet import simulate_fleet

    for service in devstack.up(settings):
        print(f"{service.name:<9} {service.state:<8} {service.url}")
    run_tag = f"demo-{int(time.time())}"
    fleet = simulate_fleet(args.executions, seed=args.seed, run_tag=run_tag)
    items = [(run.stream_id, event) for run in fleet for event in run.events]
    started = time.monotonic()
    asyncio.run(produce(settings, items))
    elapsed = time.monotonic() - started
    outcomes: dict[str, int] = {}
    for run in fleet:
        outcomes[run.outcome] = outcomes.get(run.outcome, 0) + 1
    print(f"\nsimulated fleet {run_tag}: {len(fleet)} executions, {len(items)} events "
          f"appended to {settings.events_topic} in {elapsed:.2f} s ({len(items) / max(elapsed, 1e-9):,.0f} events/s)")
    for outcome, count in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {outcome:<10} {count:>5}")
    return 0


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

    demo = sub.add_parser("demo", help="the main job: start the embedded stack and run a simulated fleet",
                          description="Starts the embedded stack and appends the events of a simulated "
                          "fleet of agents, then prints what it did.")
    demo.add_argument("--executions", type=int, default=300, help="how many executions (default 300)")
    demo.add_argument("--seed", type=int, default=7, help="random seed of the simulation (default 7)")
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
