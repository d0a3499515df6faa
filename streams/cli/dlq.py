"""``runledger dlq list|show|replay|resolve|history``: dead letters, kept in the ``dead_letters`` table until
replayed or resolved."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson
from tqdm import tqdm

from runledger.projections.records import letter_stream
from runledger.streams.cli.common import EXIT_INVALID, EXIT_USAGE, InputError, Subparsers, confirm, emit
from runledger.streams.settings import Settings
from runledger.streams.terminal import terminal_safe

__all__ = ["register"]


def register(sub: Subparsers) -> None:
    dlq = sub.add_parser(
        "dlq", help="list, inspect, replay and resolve dead letters",
        description="Dead letters are records that failed for good (or ran out of retries). Each is kept byte for "
        "byte in the dead_letters table (and a copy in <prefix>.events.dlq) until replayed or resolved; none is "
        "ever deleted. Filters: --reason, --type, --stream (each repeatable or comma-separated), --since/--until "
        "(a duration such as 2h, 30m, 1d, or an RFC 3339 time).")
    dlq_sub = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")

    lst = dlq_sub.add_parser("list", help="list dead letters, with a summary by reason",
                             description="A table of the matching dead letters in (stream, seq) order and a "
                             "summary by reason; --json prints one JSON object a line instead: the original "
                             "topic/partition/offset, key, payload, headers and ts (ms) as kcat -J names them, "
                             "plus reason, error, attempts, stream, seq, type and status.")
    _filters(lst, status=True)
    lst.add_argument("--summary", action="store_true", help="only the counts by reason")
    lst.set_defaults(func=_cmd_dlq_list)

    show = dlq_sub.add_parser("show", help="one dead letter in full: fields, headers, the decoded event",
                              description="Everything about one dead letter: its fields, the headers of its copy "
                              "in the dead-letter topic, the events parked behind it, its replay history, and the "
                              "record decoded as JSON (or its raw text).")
    show.add_argument("id", type=int, metavar="ID")
    show.add_argument("--json", action="store_true", help="one JSON object")
    show.set_defaults(func=_cmd_dlq_show)

    _register_replay(dlq_sub)
    _register_resolve(dlq_sub)

    hist = dlq_sub.add_parser("history", help="past replays: who, when, filter, outcomes",
                              description="The most recent replays, newest first.")
    hist.add_argument("--limit", type=int, default=20, metavar="N", help="how many (default 20)")
    hist.add_argument("--json", action="store_true", help="one JSON object a line")
    hist.set_defaults(func=_cmd_dlq_history)


def _register_replay(dlq_sub: Subparsers) -> None:
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
    _filters(rep)
    rep.add_argument("--dry-run", action="store_true",
                     help="apply in a transaction that is rolled back: shows per letter whether it would project "
                     "and which rows it would change; nothing is kept or sent")
    rep.add_argument("--rate", type=float, metavar="N", help="at most N letters per second")
    rep.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    rep.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    rep.set_defaults(func=_cmd_dlq_replay)


def _register_resolve(dlq_sub: Subparsers) -> None:
    res = dlq_sub.add_parser("resolve", help="mark dead letters handled without replaying them (kept)",
                             description="Marks the matching open dead letters resolved, with a note saying why "
                             "(kept for ever, never deleted). Events parked behind a resolved letter stay parked.")
    res.add_argument("ids", nargs="*", type=int, metavar="ID", help="these letters")
    _filters(res, limit=False)
    res.add_argument("--note", required=True, help="why no replay is needed")
    res.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    res.set_defaults(func=_cmd_dlq_resolve)


def _filters(p: argparse.ArgumentParser, *, status: bool = False, limit: bool = True) -> None:
    """The options that select dead letters, read back by ``_letter_filter``."""
    p.add_argument("--reason", action="append", metavar="CODE",
                   help="e.g. hash_mismatch, id_conflict, retries_exhausted")
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

    conn = await connect_one(settings.database_dsn(), settings.db_schema)
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
            emit({"total": len(rows), "by_reason": summary})
        else:
            _print_summary(rows, summary)
        return 0
    if args.json:
        for row in rows:
            emit(letter_json(row))
        return 0
    if rows:
        print(f"{'ID':>6}  {'DEAD LETTERED (UTC)':19}  {'REASON':18}  {'STREAM':28}  {'SEQ':>5}  "
              f"{'TYPE':18}  {'TRIES':>5}  {'STATUS':8}  ERROR")
    for r in rows:
        print(f"{r['id']:>6}  {r['created_at']:%Y-%m-%d %H:%M:%S}  {r['reason']:18}  "
              f"{_cut(letter_stream(r['stream_id'], r['claimed_stream_id']), 28):28}  "
              f"{r['seq'] if r['seq'] is not None else '-':>5}  "
              f"{_cut(r['event_type'] or '-', 18):18}  {r['attempts']:>5}  {r['status']:8}  {_cut(r['error'], 70)}")
    _print_summary(rows, summary)
    return 0


def _cut(text: str, width: int) -> str:
    """``text`` made safe for the terminal (it comes from a record), then cut to ``width``."""
    text = terminal_safe(text)
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
        emit(out)
        return 0
    for name in ("id", "status", "reason", "error", "attempts", "first_failure", "last_failure", "stream",
                 "claimed_stream", "seq", "type", "event_id", "topic", "partition", "offset", "key", "dlq", "replays",
                 "status_at", "status_by", "note"):
        if out.get(name) is not None:
            print(f"{name + ':':16}{terminal_safe(out[name])}")  # what came from a record, written out safely
    print("headers:")
    for key, value in out["headers"].items():
        print(f"  {terminal_safe(key)}: {terminal_safe(value)}")
    if parked:
        print(f"parked behind it: seq {', '.join(map(str, parked))} of {terminal_safe(out['stream'])}")
    for h in out["replay_history"]:
        print(f"replay {h['replay']} by {terminal_safe(h['by'])} at {h['at']}: {h['outcome']}: "
              f"{terminal_safe(h['detail'])}")
    print("event:" if out["event"] is not None else f"payload ({out.get('payload_encoding', 'utf-8')}, not JSON):")
    print(terminal_safe(orjson.dumps(out["event"], option=orjson.OPT_INDENT_2).decode() if out["event"] is not None
                        else out["payload"], lines=True))
    return 0


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
    if not (args.dry_run or args.yes or confirm(f"Replay {len(rows)} dead letters?")):
        print("nothing replayed", file=sys.stderr)
        return EXIT_USAGE
    bar = tqdm(total=len(rows), unit="letter", desc="dry run" if args.dry_run else "replaying",
               disable=True if args.quiet or args.json else None, file=sys.stderr)

    def show(item: ReplayItem) -> None:
        bar.update(1)
        if args.json:
            emit({"id": item.id, "stream": item.stream, "seq": item.seq, "outcome": item.outcome,
                  "detail": item.detail, "rows": item.rows, "cost_usd": str(item.cost_usd), "dry_run": args.dry_run})
        else:
            rows_text = ", ".join(f"{t} {n}" for t, n in item.rows.items()) or "none"
            tqdm.write(terminal_safe(f"#{item.id} {item.stream or '-'} seq {item.seq or '-'}: "
                                     f"{'would be ' if args.dry_run and item.outcome != 'skipped' else ''}"
                                     f"{item.outcome}: {item.detail} [rows written: {rows_text}]"), file=sys.stdout)

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
        emit({"replay": report.replay_id, "dry_run": report.dry_run, "selected": report.selected,
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
        if not (args.yes or letters.ids) and not confirm(f"Resolve {len(rows)} dead letters (kept, not replayed)?"):
            raise InputError("nothing resolved")
        return await resolve(conn, [r["id"] for r in rows], args.note, run_by())

    done = asyncio.run(_with_owner(settings, work))
    if args.json:
        emit({"resolved": done})
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
            emit(record)
        else:
            print(f"replay {r['id']} {r['started_at']:%Y-%m-%d %H:%M:%S} by {r['run_by']}: {r['status']}, "
                  f"{r['selected']} selected, {r['outcomes']}, filter {r['filter']}")
    return 0
