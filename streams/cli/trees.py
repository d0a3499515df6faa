"""``runledger trees rebuild``: build from the log the transparency trees of partitions projected before
migration 012."""

from __future__ import annotations

import argparse
import asyncio
import sys

from tqdm import tqdm

from runledger.streams.cli.common import Subparsers, emit
from runledger.streams.settings import Settings

__all__ = ["register"]


def register(sub: Subparsers) -> None:
    trees = sub.add_parser(
        "trees", help="the per-partition transparency trees: build those that lag the projections",
        description="Each partition of the log topic has a transparency tree (migration 012): leaf i is the i-th "
        "record of the partition. Workers hold back a partition whose tree ends before where it was projected to "
        "(projected before migration 012): its next leaf would get a wrong index.")
    actions = trees.add_subparsers(dest="action", required=True, metavar="ACTION")
    rebuild = actions.add_parser(
        "rebuild", help="build each lagging partition's tree from the log, up to where it was projected",
        description="For each partition of <prefix>.events whose tree ends before the offset stored for the "
        "consumer group, reads the partition from where the tree ends up to that offset and appends every record's "
        "leaf (checking that the last one is the record projected there), then names each audit row at those "
        "positions its leaf; one transaction per partition, under the tree's row lock. Running workers resume the "
        "partitions within a minute. A second run does nothing. Exit status 2 if the log no longer holds what was "
        "projected (see `runledger offsets check`).")
    rebuild.add_argument("--json", action="store_true", help="print the report as one JSON object, no progress bar")
    trees.set_defaults(func=_cmd_trees)


def _cmd_trees(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.tools.trees import rebuild_trees

    bar = tqdm(unit="rec", desc="building trees", disable=True if args.json else None, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        report = asyncio.run(rebuild_trees(settings, progress))
    finally:
        bar.close()
    if args.json:
        emit(report.as_dict())
    elif not report.partitions:
        print(f"nothing to build: every tree of {settings.events_topic} covers what group {settings.consumer_group} "
              "projected")
    else:
        for p in report.partitions:
            print(f"partition {p.partition}: {p.leaves_added:,} leaves added for offsets {p.from_offset:,}.."
                  f"{p.to_offset - 1:,} (tree {p.tree}, size {p.size:,}); {p.audit_rows:,} audit rows given "
                  "their leaf")
    return 0
