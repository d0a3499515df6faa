"""``runledger offsets check|reset``: the offsets stored with the projections against the log, and projecting
again after the log was recreated."""

from __future__ import annotations

import argparse
import asyncio
import sys

from runledger.streams.cli.common import EXIT_INVALID, EXIT_USAGE, Subparsers, confirm, emit
from runledger.streams.settings import Settings

__all__ = ["register"]


def register(sub: Subparsers) -> None:
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


def _cmd_offsets(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.worker.logcheck import check_log, reset_offsets

    if args.action == "check":
        checks = asyncio.run(check_log(settings))
        for c in checks:
            if args.json:
                emit(c.as_dict())
            else:
                stored = "-" if c.stored is None else f"{c.stored:,}"
                print(f"partition {c.partition:>3}  projected to {stored:>12}  log {c.start:,}..{c.end:,}  "
                      f"{f'{c.problem}; {c.fix}' if c.problem else 'ok'}")
        return EXIT_INVALID if any(c.problem for c in checks) else 0
    checks = asyncio.run(check_log(settings))
    chosen = [c for c in checks if c.resettable and (not args.partition
                                                                                or c.partition in args.partition)]
    if not chosen:
        print(f"nothing to reset: every partition of {settings.events_topic} matches what group "
              f"{settings.consumer_group} projected", file=sys.stderr)
        if any(c.problem for c in checks):
            print("(a partition's transparency tree does not match: see `runledger offsets check`)", file=sys.stderr)
        return 0
    for c in chosen:
        print(f"partition {c.partition}: {c.problem}", file=sys.stderr)
    if not (args.yes or confirm(f"Project {len(chosen)} partitions again from the start of the log as it is now "
                                "(the existing projections are kept)?")):
        print("nothing reset", file=sys.stderr)
        return EXIT_USAGE
    done = asyncio.run(reset_offsets(settings, [c.partition for c in chosen]))
    for c in done:
        if args.json:
            emit({"partition": c.partition, "from": c.stored, "to": c.start})
        else:
            print(f"partition {c.partition}: projected again from offset {c.start} (was {c.stored}); running "
                  "workers resume it within a minute")
    return 0
