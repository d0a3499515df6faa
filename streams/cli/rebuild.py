"""``runledger rebuild``: re-project the whole log into new tables, compare them with the live ones, switch over."""

from __future__ import annotations

import argparse
import asyncio
import sys

from tqdm import tqdm

from runledger.streams.cli.common import EXIT_INVALID, Subparsers, emit
from runledger.streams.runtime import tune_gc
from runledger.streams.settings import Settings

__all__ = ["register"]


def register(sub: Subparsers) -> None:
    rebuild = sub.add_parser(
        "rebuild", help="re-project the whole log into new tables, compare, and switch over",
        description="Re-projects the log from offset 0 into a new schema <schema>_rebuild_<time> while the live "
        "tables keep serving (a log whose start was deleted is refused). It then compares every table with the "
        "live one at a snapshot, streaming, and again, round by round, the streams that moved since, without "
        "stopping the workers. If all are equal it switches in a section of well under a second (workers pause "
        "between two batches): the live executions, steps, costs, artifacts, stream heads and parked events "
        "move to <schema>_retired_<time> (kept), the rebuilt ones take their place. The audit log and its "
        "transparency log and checkpoints, the dead letters with their resolutions and notes, the replay history "
        "and the offsets stay as they are. Interrupted, it resumes where it stopped when run again. Exit status "
        "0 switched (or equal, with --no-switch), 1 tables differ.")
    rebuild.add_argument("--no-switch", action="store_true",
                         help="build and compare only; keep the rebuilt schema (a later rebuild resumes it)")
    rebuild.add_argument("--force", action="store_true",
                         help="switch even if derived tables differ (after a deliberate change of the projection "
                         "rules); never if the audit log differs, since the events projected would then differ")
    rebuild.add_argument("--fresh", action="store_true",
                         help="drop an interrupted or kept rebuild of this schema and start again from offset 0")
    rebuild.add_argument("--json", action="store_true", help="print the report as one JSON object, no progress bar")
    rebuild.set_defaults(func=_cmd_rebuild)


def _cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.tools.rebuild import rebuild

    tune_gc()
    bar = tqdm(unit="ev", desc="re-projecting", disable=True if args.json else None, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    report = asyncio.run(rebuild(settings, force=args.force, switch=not args.no_switch, fresh=args.fresh,
                                 progress=progress))
    bar.close()
    if args.json:
        emit(report.as_dict())
    else:
        resumed = f", resumed at record {report.resumed_from:,}" if report.resumed_from else ""
        print(f"re-projected {report.records:,} records of {settings.events_topic} into {report.rebuilt_schema} "
              f"in {report.seconds:.1f} s{resumed}; compared in {report.rounds} rounds\n")
        print(f"{'table':<14}{'live rows':>11}{'rebuilt rows':>14}  {'live md5':<34}{'rebuilt md5':<34}")
        for table, ((live_rows, live_md5), (new_rows, new_md5)) in report.checksums.items():
            mark = "DIFFERENT" if table in report.differing else "equal"
            print(f"{table:<14}{live_rows:>11,}{new_rows:>14,}  {live_md5:<34}{new_md5:<34}{mark}")
        if report.switched:
            print(f"\nswitched in {report.lock_held_s or 0:.3f} s: {report.live_schema} now holds the rebuilt tables; "
                  f"the previous ones are kept in {report.retired_schema} (DROP SCHEMA {report.retired_schema} "
                  "CASCADE when no longer needed)")
        else:
            why = ("as asked (--no-switch)" if args.no_switch else "because the audit log differs" if "audit_log" in
                   report.differing else "because the tables differ (--force to switch)")
            print(f"\nnot switched {why}: the rebuilt tables are in {report.rebuilt_schema}")
    return 0 if report.switched or (args.no_switch and report.equal) else EXIT_INVALID
