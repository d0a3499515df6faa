"""``runledger verify chains``: prove the stored record intact, or name the stream and seq where it is not."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime

from tqdm import tqdm

from runledger.streams.cli.common import EXIT_INVALID, Subparsers, emit
from runledger.streams.settings import Settings

__all__ = ["register"]


def _utc(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset: write it as 2026-11-22T10:00:00Z")
    return moment


def register(sub: Subparsers) -> None:
    verify = sub.add_parser(
        "verify", help="recompute every hash and link of the stored record and say where it is not intact",
        description="Checks the record without trusting the tables. Exit status 0 intact, 1 something is not "
        "(each finding names the stream, seq and event id, the check that failed and why).")
    checks = verify.add_subparsers(dest="check", required=True, metavar="CHECK")
    chains = checks.add_parser(
        "chains", help="every stream of audit_log, from its stored bytes",
        description="Reads audit_log in one snapshot, stream by stream in seq order, and recomputes each "
        "event's hash (SPEC.md section 3) from its stored bytes. A stream is reported at its first problem: "
        "not_json, hash_mismatch (the bytes were changed), row_mismatch (a column says something else than the "
        "bytes: rows swapped or edited), first_missing, seq_gap and seq_duplicate (rows deleted or added), "
        "chain_broken (a prevhash does not link), head_mismatch, head_missing and stream_missing (stream_heads "
        "does not end where the stored events do: an event deleted or forged at the end, or a whole stream "
        "deleted). A stream rewritten whole with a consistent new chain, heads included, is only caught against "
        "a checkpoint taken before.")
    chains.add_argument("--stream", metavar="ID", help="only this stream")
    chains.add_argument("--since", type=_utc, metavar="TIME",
                        help="only streams with an event recorded (or a head moved) since TIME, e.g. "
                        "2026-11-22T10:00:00Z; each is checked whole")
    chains.add_argument("--json", action="store_true", help="print the report as one JSON object, no progress bar")
    verify.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.projections.postgres.verify import verify_chains

    bar = tqdm(unit="ev", desc="verifying", disable=True if args.json else None, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        report = asyncio.run(verify_chains(settings.database_url, settings.db_schema, stream=args.stream,
                                           since=args.since, progress=progress))
    finally:
        bar.close()
    if args.json:
        emit(report.as_dict())
    else:
        for f in report.findings:
            seq = f"seq {f.seq}" if f.seq is not None else "no seq"
            event = f" (event {f.event_id})" if f.event_id else ""
            print(f"NOT INTACT  {f.stream_id}  {seq}{event}  {f.code}: {f.reason}")
        rate = report.as_dict()
        print(f"{report.events:,} events of {report.streams:,} streams checked in {report.seconds:.2f} s "
              f"({rate['events_per_s'] or 0:,} events/s; {rate['events_per_cpu_s'] or 0:,} per CPU second of this "
              f"process): " + ("intact" if report.intact else f"{len(report.findings)} streams not intact"))
    return 0 if report.intact else EXIT_INVALID
