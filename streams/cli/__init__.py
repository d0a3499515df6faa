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

from runledger.schemas.chain import canonical, compute_hash
from runledger.schemas.errors import PermanentError, RunledgerError
from runledger.schemas.events import decode_event, decode_json, parse_event
from runledger.streams.dev import devstack
from runledger.streams.producer.client import Appended, NewEvent, append_many, check_new_events
from runledger.streams.settings import Settings

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
            detail = f"  {service.detail}" if service.detail else ""
            print(f"{service.name:<9} {service.state:<12} {service.url:<52} {pid}{detail}")
    postgres = next(s for s in services if s.name == "postgres")
    if args.action == "status" and postgres.state in ("running", "external"):
        _print_health(args, settings)
    return 0


def _print_health(args: argparse.Namespace, settings: Settings) -> None:
    """The workers of the group and the partitions they hold back (dev status)."""
    from runledger.streams.worker.logcheck import projection_health

    try:
        health = asyncio.run(projection_health(settings))
    except RunledgerError as e:
        health = {"error": str(e), "workers": [], "problems": []}
    if args.json:
        _emit({"name": "projection", "schema": settings.db_schema, "group": settings.consumer_group, **health})
        return
    workers = health["workers"]
    print(f"{'workers':<9} {len(workers)} running in group {settings.consumer_group}"
          + "".join(f"; pid {w['pid']} on {w['host']}, partitions {w['partitions']}" for w in workers))
    for p in health["problems"]:
        print(f"{'STALLED':<9} partition {p['partition']} since {p['detected_at']}: {p['problem']}")
    if health.get("error"):
        print(f"{'workers':<9} unknown: {health['error']}")


# hash -----------------------------------------------------------------------------------------

def hash_report(line: str) -> dict[str, Any]:
    """The ``runledger hash`` verdict on one line of input; a line over 512 KiB is ``too_large``."""
    try:
        raw = decode_event(line.rstrip("\r\n"))  # the line's end is not part of the event
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

    try:
        streams = asyncio.run(append_many(settings, items, on_appended=show if args.json else None,
                                          progress=not args.quiet))
    except PermanentError as e:  # refused for what it is (the stream's lifecycle, say): say why, by its code
        raise InputError(f"{e.code}: {e}") from None
    elapsed = time.monotonic() - started
    print(f"appended {len(items)} events to {streams} streams in {elapsed:.2f} s "
          f"({len(items) / max(elapsed, 1e-9):,.0f} events/s) on topic {settings.events_topic}", file=sys.stderr)
    return 0


# db, worker ------------------------------------------------------------------------------------

def _cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.projections.postgres.db import migrate

    applied = asyncio.run(migrate(settings.database_url, settings.db_schema))
    print(f"schema {settings.db_schema}: " + (f"applied {', '.join(applied)}" if applied else "up to date"))
    return 0


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.topics import ensure_topics, worker_topics
    from runledger.streams.worker.app import create_app

    # Before Faust starts: a worker may start before any producer, and the retry topics need the
    # log's partition count and infinite retention, not Faust's defaults.
    asyncio.run(ensure_topics(settings.kafka_bootstrap_servers, worker_topics(settings)))
    app = create_app(settings)
    worker = app.Worker(loglevel=args.loglevel, quiet=True)
    worker.execute_from_commandline()
    return 0


# wait -----------------------------------------------------------------------------------------

def _cmd_wait(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.projections.postgres.wait import wait_projected

    result = asyncio.run(wait_projected(settings.database_url, settings.db_schema, args.stream, args.seq,
                                        event_id=args.id, timeout=args.timeout, group_id=settings.consumer_group,
                                        topic=settings.events_topic,
                                        note=lambda text: print(f"note: {text}; waiting anyway", file=sys.stderr)))
    if args.json:
        _emit(result.as_dict())
    elif result.status == "projected":
        print(f"projected: {result.stream_id} seq {result.seq} (event {result.event_id}, hash {result.hash}) "
              f"after {result.waited_s:.3f} s")
    elif result.status == "rejected":
        print(f"rejected: {result.stream_id} seq {result.seq} (event {result.event_id}): "
              f"{result.reason}: {result.error} (see `runledger dlq show {result.dead_letter_id}`)")
    elif result.status == "stalled":
        print(f"stalled: {result.stream_id} seq {result.seq} is not projected: {result.error}")
    else:
        print(f"timed out after {result.waited_s:.1f} s: {result.stream_id} seq {result.seq} is {result.error}")
    return {"projected": 0, "rejected": EXIT_INVALID, "stalled": EXIT_TRANSIENT}.get(result.status, EXIT_TIMEOUT)


# heads ----------------------------------------------------------------------------------------

def _cmd_heads(args: argparse.Namespace, settings: Settings) -> int:
    from redis.asyncio import Redis

    from runledger.streams.producer.client import EventProducer
    from runledger.streams.producer.recovery import check_heads, recover_heads

    if args.action == "check":
        rows = asyncio.run(check_heads(settings))
        for row in rows:
            if args.json:
                _emit(row)
            else:
                print(f"{row['stream'] or '(all)'}: redis {row['redis']}, log {row['log']}, projected "
                      f"{row['projected']}: {'; '.join(row['problems'])}")
        if not args.json:
            print("heads agree" if not rows else f"{len(rows)} disagreements", file=sys.stderr)
        return EXIT_INVALID if rows else 0
    if args.action == "recover":
        async def recover() -> tuple[int, int]:
            redis = Redis.from_url(settings.redis_url)
            try:
                await redis.delete(f"{settings.topic_prefix}:heads:complete")
                return await recover_heads(redis, settings)
            finally:
                await redis.aclose()

        streams, moved = asyncio.run(recover())
        if args.json:
            _emit({"streams": streams, "moved": moved})
        else:
            print(f"{streams} streams in the log; {moved} heads moved forward in Redis")
        return 0

    async def sweep() -> list[tuple[str, int, int]]:
        async with EventProducer(settings.model_copy(update={"producer_sweep_s": 0})) as producer:
            return await producer.sweep()

    done = asyncio.run(sweep())
    for stream, first, last in done:
        if args.json:
            _emit({"stream": stream, "first_seq": first, "last_seq": last})
        else:
            print(f"{stream}: published seq {first}..{last}")
    if not args.json:
        print(f"{len(done)} staged batches published", file=sys.stderr)
    return 0


# offsets --------------------------------------------------------------------------------------

def _cmd_offsets(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.worker.logcheck import check_log, reset_offsets

    if args.action == "check":
        checks = asyncio.run(check_log(settings))
        for c in checks:
            if args.json:
                _emit(c.as_dict())
            else:
                stored = "-" if c.stored is None else f"{c.stored:,}"
                print(f"partition {c.partition:>3}  projected to {stored:>12}  log {c.start:,}..{c.end:,}  "
                      f"{c.problem or 'ok'}")
        return EXIT_INVALID if any(c.problem for c in checks) else 0
    chosen = [c for c in asyncio.run(check_log(settings)) if c.problem and (not args.partition
                                                                             or c.partition in args.partition)]
    if not chosen:
        print(f"nothing to reset: every partition of {settings.events_topic} matches what group "
              f"{settings.consumer_group} projected", file=sys.stderr)
        return 0
    for c in chosen:
        print(f"partition {c.partition}: {c.problem}", file=sys.stderr)
    if not (args.yes or _confirm(f"Project {len(chosen)} partitions again from the start of the log as it is now "
                                 "(the existing projections are kept)?")):
        print("nothing reset", file=sys.stderr)
        return EXIT_USAGE
    done = asyncio.run(reset_offsets(settings, [c.partition for c in chosen]))
    for c in done:
        if args.json:
            _emit({"partition": c.partition, "from": c.stored, "to": c.start})
        else:
            print(f"partition {c.partition}: projected again from offset {c.start} (was {c.stored}); running "
                  "workers resume it within seconds")
    return 0


# dlq ------------------------------------------------------------------------------------------

def _letter_filter(args: argparse.Namespace, *, statuses: tuple[str, ...] = ("dead",)) -> Any:
    from runledger.streams.tools.dlq import STATUSES, LetterFilter, parse_time

    def many(values: list[str] | None) -> tuple[str, ...]:
        return tuple(part.strip() for v in values or [] for part in v.split(",") if part.strip())

    status = getattr(args, "status", None)
    if status:
        statuses = STATUSES if status == ["all"] else many(status)
    return LetterFilter(
        ids=tuple(getattr(args, "ids", None) or ()), reasons=many(args.reason), types=many(args.type),
        streams=many(args.stream), since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until, option="--until") if args.until else None, statuses=statuses,
        limit=getattr(args, "limit", None))


async def _with_owner(settings: Settings, work: Any) -> Any:
    import asyncpg

    from runledger.projections.postgres.db import connect_one

    conn = await connect_one(settings.database_url, settings.db_schema)
    try:
        return await work(conn)
    except asyncpg.UndefinedTableError:
        raise InputError(f"schema {settings.db_schema} has no dead_letters table: run `runledger db migrate` "
                         "(or start a worker) first") from None
    finally:
        await conn.close()


def _cmd_dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.tools.dlq import letter_json, select_letters, summary_by_reason

    letters = _letter_filter(args)
    rows = asyncio.run(_with_owner(settings, lambda conn: select_letters(conn, letters)))
    summary = summary_by_reason(rows)
    if args.summary:
        if args.json:
            _emit({"total": len(rows), "by_reason": summary})
        else:
            _print_summary(rows, summary)
        return 0
    if args.json:
        for row in rows:
            _emit(letter_json(row))
        return 0
    if rows:
        print(f"{'ID':>6}  {'DEAD LETTERED (UTC)':19}  {'REASON':18}  {'STREAM':28}  {'SEQ':>5}  "
              f"{'TYPE':18}  {'TRIES':>5}  {'STATUS':8}  ERROR")
    for r in rows:
        print(f"{r['id']:>6}  {r['created_at']:%Y-%m-%d %H:%M:%S}  {r['reason']:18}  "
              f"{_cut(r['stream_id'] or '-', 28):28}  {r['seq'] if r['seq'] is not None else '-':>5}  "
              f"{_cut(r['event_type'] or '-', 18):18}  {r['attempts']:>5}  {r['status']:8}  {_cut(r['error'], 70)}")
    _print_summary(rows, summary)
    return 0


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _print_summary(rows: list[Any], summary: dict[str, int]) -> None:
    if not rows:
        print("no dead letters match")
        return
    streams = len({r["stream_id"] for r in rows if r["stream_id"]})
    print(f"{len(rows)} dead letters of {streams} streams: "
          + ", ".join(f"{reason} {n}" for reason, n in summary.items()))


def _cmd_dlq_show(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.projections.postgres.queries import query
    from runledger.streams.tools.dlq import LetterFilter, letter_json, select_letters

    async def load(conn: Any) -> tuple[Any, list[Any], list[int]]:
        rows = await select_letters(conn, LetterFilter(ids=(args.id,), statuses=()))
        if not rows:
            raise InputError(f"ID: no dead letter {args.id} in schema {settings.db_schema}")
        history = await conn.fetch(query("dlq_letter_replays"), args.id)
        parked = [r["seq"] for r in await conn.fetch(query("dlq_parked_behind"), rows[0]["stream_id"])] \
            if rows[0]["stream_id"] else []
        return rows[0], history, parked

    row, history, parked = asyncio.run(_with_owner(settings, load))
    out = letter_json(row, decoded=True)
    out["replay_history"] = [{"replay": h["replay_id"], "by": h["run_by"], "outcome": h["outcome"],
                              "detail": h["detail"], "at": h["at"].isoformat()} for h in history]
    out["parked_behind"] = parked
    if args.json:
        _emit(out)
        return 0
    for name in ("id", "status", "reason", "error", "attempts", "first_failure", "last_failure", "stream", "seq",
                 "type", "event_id", "topic", "partition", "offset", "key", "dlq", "replays", "status_at",
                 "status_by", "note"):
        if out.get(name) is not None:
            print(f"{name + ':':15}{out[name]}")
    print("headers:")
    for key, value in out["headers"].items():
        print(f"  {key}: {value}")
    if parked:
        print(f"parked behind it: seq {', '.join(map(str, parked))} of {out['stream']}")
    for h in out["replay_history"]:
        print(f"replay {h['replay']} by {h['by']} at {h['at']}: {h['outcome']}: {h['detail']}")
    print("event:" if out["event"] is not None else f"payload ({out.get('payload_encoding', 'utf-8')}, not JSON):")
    print(orjson.dumps(out["event"], option=orjson.OPT_INDENT_2).decode() if out["event"] is not None
          else out["payload"])
    return 0


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise InputError("stdin is not a terminal to confirm on: add --yes")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _cmd_dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    from runledger.streams.tools.dlq import select_letters, summary_by_reason
    from runledger.streams.tools.replay import ReplayItem, replay

    if args.rate is not None and args.rate <= 0:
        raise InputError(f"--rate: must be above 0 events per second, not {args.rate}")
    letters = _letter_filter(args)
    rows = asyncio.run(_with_owner(settings, lambda conn: select_letters(conn, letters)))
    if not rows:
        print("no dead letters match: nothing to replay", file=sys.stderr)
        return 0
    streams = len({r["stream_id"] for r in rows if r["stream_id"]})
    reasons = ", ".join(f"{k} {n}" for k, n in summary_by_reason(rows).items())
    what = f"{len(rows)} dead letters of {streams} streams ({reasons}) into schema {settings.db_schema}"
    print(("dry run, nothing is kept: " if args.dry_run else "replaying ") + what, file=sys.stderr)
    if not (args.dry_run or args.yes or _confirm(f"Replay {len(rows)} dead letters?")):
        print("nothing replayed", file=sys.stderr)
        return EXIT_USAGE
    bar = tqdm(total=len(rows), unit="letter", desc="dry run" if args.dry_run else "replaying",
               disable=True if args.quiet or args.json else None, file=sys.stderr)

    def show(item: ReplayItem) -> None:
        bar.update(1)
        if args.json:
            _emit({"id": item.id, "stream": item.stream, "seq": item.seq, "outcome": item.outcome,
                   "detail": item.detail, "rows": item.rows, "cost_usd": str(item.cost_usd), "dry_run": args.dry_run})
        else:
            rows_text = ", ".join(f"{t} {n}" for t, n in item.rows.items()) or "none"
            tqdm.write(f"#{item.id} {item.stream or '-'} seq {item.seq or '-'}: "
                       f"{'would be ' if args.dry_run and item.outcome != 'skipped' else ''}{item.outcome}: "
                       f"{item.detail} [rows written: {rows_text}]", file=sys.stdout)

    async def run() -> Any:
        task = asyncio.current_task()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # type: ignore[union-attr]
        return await replay(settings, rows, letters.as_json(), dry_run=args.dry_run, rate=args.rate, on_item=show)

    try:
        report = asyncio.run(run())
    finally:
        bar.close()
    outcomes = ", ".join(f"{k} {n}" for k, n in report.outcomes.items())
    if args.json:
        _emit({"replay": report.replay_id, "dry_run": report.dry_run, "selected": report.selected,
               "done": len(report.items), "outcomes": report.outcomes, "interrupted": report.interrupted})
    else:
        label = "dry run" if report.dry_run else f"replay {report.replay_id}"
        print(f"{label}: {len(report.items)} of {report.selected} letters: {outcomes or 'none'}", file=sys.stderr)
    if report.interrupted:
        print(f"interrupted: run the same command again to resume ({report.selected - len(report.items)} left; "
              "letters already replayed are not replayed twice)", file=sys.stderr)
        return 130
    return EXIT_INVALID if report.outcomes.get("failed") else 0


def _cmd_dlq_resolve(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.tools.dlq import resolve, select_letters
    from runledger.streams.tools.replay import run_by

    if not args.note.strip():
        raise InputError("--note: say why these letters need no replay")
    letters = _letter_filter(args)
    if not letters.narrows:
        raise InputError("name dead letters by ID or narrow with --reason/--type/--stream/--since/--until "
                         "(resolving every letter at once is refused)")

    async def work(conn: Any) -> list[int]:
        rows = await select_letters(conn, letters)
        if not rows:
            return []
        if not (args.yes or letters.ids) and not _confirm(f"Resolve {len(rows)} dead letters (kept, not replayed)?"):
            raise InputError("nothing resolved")
        return await resolve(conn, [r["id"] for r in rows], args.note, run_by())

    done = asyncio.run(_with_owner(settings, work))
    if args.json:
        _emit({"resolved": done})
    else:
        print(f"resolved {len(done)} dead letters" + (f": {', '.join(map(str, done))}" if done else ""))
    return 0


def _cmd_dlq_history(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.projections.postgres.queries import query

    rows = asyncio.run(_with_owner(settings, lambda conn: conn.fetch(query("dlq_replays"), args.limit)))
    for r in rows:
        record = {"replay": r["id"], "started_at": r["started_at"].isoformat(), "run_by": r["run_by"],
                  "status": r["status"], "selected": r["selected"], "filter": orjson.loads(r["filter"]),
                  "outcomes": orjson.loads(r["outcomes"]),
                  "finished_at": r["finished_at"].isoformat() if r["finished_at"] else None}
        if args.json:
            _emit(record)
        else:
            print(f"replay {r['id']} {r['started_at']:%Y-%m-%d %H:%M:%S} by {r['run_by']}: {r['status']}, "
                  f"{r['selected']} selected, {r['outcomes']}, filter {r['filter']}")
    return 0


# rebuild --------------------------------------------------------------------------------------

def _cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.tools.rebuild import rebuild

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
    from runledger.streams.dev.bench import run_bench

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
    from runledger.streams.dev.demo import run_demo

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
                          "status 0 projected, 1 rejected, 4 timed out, 3 PostgreSQL unreachable or the stream's "
                          "partition stalled (the log no longer matches the projection: see `runledger offsets`).")
    wait.add_argument("stream", help="the stream id (the event's subject)")
    wait.add_argument("seq", type=int, help="the event's seq")
    wait.add_argument("--id", help="the event id: only this event counts (another event at the same seq "
                      "does not end the wait)")
    wait.add_argument("--timeout", type=float, default=30.0, metavar="S", help="give up after S seconds (default 30)")
    wait.add_argument("--json", action="store_true", help="print the result as one JSON object")
    wait.set_defaults(func=_cmd_wait)

    dlq = sub.add_parser(
        "dlq", help="list, inspect, replay and resolve dead letters",
        description="Dead letters are records that failed for good (or ran out of retries). Each is kept byte for "
        "byte in the dead_letters table (and a copy in <prefix>.events.dlq) until replayed or resolved; none is "
        "ever deleted. Filters: --reason, --type, --stream (each repeatable or comma-separated), --since/--until "
        "(a duration such as 2h, 30m, 1d, or an RFC 3339 time).")
    dlq_sub = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")

    def filters(p: argparse.ArgumentParser, *, status: bool = False, limit: bool = True) -> None:
        p.add_argument("--reason", action="append", metavar="CODE", help="e.g. hash_mismatch, retries_exhausted")
        p.add_argument("--type", action="append", metavar="TYPE", help="event type, e.g. step.completed")
        p.add_argument("--stream", action="append", metavar="ID", help="stream id (the event's subject)")
        p.add_argument("--since", metavar="TIME", help="dead-lettered at or after: 2h, 30m, 1d or RFC 3339")
        p.add_argument("--until", metavar="TIME", help="dead-lettered before: 2h, 30m, 1d or RFC 3339")
        if status:
            p.add_argument("--status", action="append", metavar="STATUS",
                           help="dead (default), replayed, resolved, or all")
        if limit:
            p.add_argument("--limit", type=int, metavar="N", help="at most N letters (in stream, seq order)")
        p.add_argument("--json", action="store_true", help="one JSON object a line (kcat-like field names)")

    lst = dlq_sub.add_parser("list", help="list dead letters, with a summary by reason",
                             description="A table of the matching dead letters in (stream, seq) order and a "
                             "summary by reason; --json prints one JSON object a line instead: the original "
                             "topic/partition/offset, key, payload, headers and ts (ms) as kcat -J names them, "
                             "plus reason, error, attempts, stream, seq, type and status.")
    filters(lst, status=True)
    lst.add_argument("--summary", action="store_true", help="only the counts by reason")
    lst.set_defaults(func=_cmd_dlq_list)

    show = dlq_sub.add_parser("show", help="one dead letter in full: fields, headers, the decoded event",
                              description="Everything about one dead letter: its fields, the headers of its copy "
                              "in the dead-letter topic, the events parked behind it, its replay history, and the "
                              "record decoded as JSON (or its raw text).")
    show.add_argument("id", type=int, metavar="ID")
    show.add_argument("--json", action="store_true", help="one JSON object")
    show.set_defaults(func=_cmd_dlq_show)

    rep = dlq_sub.add_parser(
        "replay", help="apply dead letters again (after a fix), in stream and seq order",
        description="Applies the matching open dead letters again with this installation's rules and the newest "
        "stored price catalog, in (stream, seq) order, each in its own transaction; events parked behind a letter "
        "follow it. Each replay is recorded (who, when, filter, outcome per letter: `runledger dlq history`); "
        "a letter that projects, or turns out a duplicate, is marked replayed and never replayed again, so an "
        "interrupted replay resumes by running the same command, and a second run changes nothing. A Redis lock "
        "keeps two replays of one schema apart. Exit status 0 all replayed, 1 some failed again, 130 "
        "interrupted.")
    rep.add_argument("ids", nargs="*", type=int, metavar="ID", help="only these letters")
    filters(rep)
    rep.add_argument("--dry-run", action="store_true",
                     help="apply in a transaction that is rolled back: shows per letter whether it would project "
                     "and which rows it would change; nothing is kept or sent")
    rep.add_argument("--rate", type=float, metavar="N", help="at most N letters per second")
    rep.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    rep.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    rep.set_defaults(func=_cmd_dlq_replay)

    res = dlq_sub.add_parser("resolve", help="mark dead letters handled without replaying them (kept)",
                             description="Marks the matching open dead letters resolved, with a note saying why "
                             "(kept for ever, never deleted). Events parked behind a resolved letter stay parked.")
    res.add_argument("ids", nargs="*", type=int, metavar="ID", help="these letters")
    filters(res, limit=False)
    res.add_argument("--note", required=True, help="why no replay is needed")
    res.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    res.set_defaults(func=_cmd_dlq_resolve)

    hist = dlq_sub.add_parser("history", help="past replays: who, when, filter, outcomes",
                              description="The most recent replays, newest first.")
    hist.add_argument("--limit", type=int, default=20, metavar="N", help="how many (default 20)")
    hist.add_argument("--json", action="store_true", help="one JSON object a line")
    hist.set_defaults(func=_cmd_dlq_history)

    heads = sub.add_parser(
        "heads", help="the chain heads producers keep in Redis: check, recover, sweep",
        description="Each stream's head (seq, hash) lives in Redis; an append stages its batch there before "
        "publishing it. If Redis loses its data, producers recover every head from the log before they append "
        "again (never seq 1 for an existing stream). `check` compares Redis, the log and PostgreSQL; `recover` "
        "recovers now; `sweep` publishes every batch a producer staged but did not publish (it failed or died), "
        "as producers and workers do every RUNLEDGER_PRODUCER_SWEEP_S seconds.")
    heads_sub = heads.add_subparsers(dest="action", required=True, metavar="ACTION")
    hcheck = heads_sub.add_parser("check", help="compare the heads in Redis, the log and PostgreSQL (exit status 1 "
                                  "on any disagreement)")
    hcheck.add_argument("--json", action="store_true", help="one JSON object per disagreement")
    hrecover = heads_sub.add_parser("recover", help="move every head in Redis forward to the log's")
    hrecover.add_argument("--json", action="store_true", help="the counts as one JSON object")
    sweep = heads_sub.add_parser("sweep", help="publish batches left staged now (whose lease has expired)")
    sweep.add_argument("--json", action="store_true", help="one JSON object per batch published")
    heads.set_defaults(func=_cmd_heads)

    offsets = sub.add_parser(
        "offsets", help="check the stored offsets against the log; reset them after the log was recreated",
        description="The offsets that count are stored in PostgreSQL with the projections. A worker refuses to "
        "project a partition whose log no longer matches them (the log topic was recreated or emptied, as an "
        "in-memory broker's log is by a restart), and says so in `runledger dev status`, "
        "`runledger wait` and its log. `check` compares every partition; `reset` projects the partitions with a "
        "problem again from the start of the log as it is now, keeping the projections made so far.")
    offsets_sub = offsets.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = offsets_sub.add_parser("check", help="compare each partition of the log with the stored offsets "
                                   "(exit status 1 if one does not match)")
    check.add_argument("--json", action="store_true", help="one JSON object per partition")
    reset = offsets_sub.add_parser("reset", help="project the partitions whose log does not match again from "
                                   "its start")
    reset.add_argument("--partition", type=int, action="append", metavar="N", help="only this partition "
                       "(repeatable)")
    reset.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    reset.add_argument("--json", action="store_true", help="one JSON object per partition reset")
    offsets.set_defaults(func=_cmd_offsets)

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

