"""``runledger rebuild``: re-project the whole log into new tables, compare them with the live ones, switch over."""

from __future__ import annotations

import argparse
import asyncio
import sys

from tqdm import tqdm

from runledger.streams.cli.common import EXIT_INVALID, Subparsers, emit
from runledger.streams.settings import Settings

__all__ = ["register"]


def register(sub: Subparsers) -> None:
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


def _cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.tools.rebuild import rebuild

    bar = tqdm(unit="ev", desc="re-projecting", disable=True if args.json else None, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    report = asyncio.run(rebuild(settings, force=args.force, switch=not args.no_switch, progress=progress))
    bar.close()
    if args.json:
        emit(report.as_dict())
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
