"""``runledger verify``: prove the stored record, or the log it was projected from, intact, or name the stream and
seq where it is not."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from tqdm import tqdm

from runledger.schemas.checkpoint import Checkpoint, CheckpointError, Verifier
from runledger.schemas.errors import RunledgerError
from runledger.streams.cli.common import EXIT_INVALID, EXIT_USAGE, Subparsers, emit, utc_time
from runledger.streams.runtime import tune_gc
from runledger.streams.settings import Settings
from runledger.streams.terminal import terminal_safe

__all__ = ["register"]


def register(sub: Subparsers) -> None:
    verify = sub.add_parser(
        "verify", help="recompute every hash and link of the stored record and say where it is not intact",
        description="Checks the record without trusting the tables: `verify chains`, `verify projection`, `verify "
        "log` (the log topic itself, and PostgreSQL against it), or `verify --checkpoint FILE`, which rebuilds a "
        "log partition's transparency log from its records up to a signed checkpoint's size, compares the root "
        "with the signed one, and the partition's stored events under it with the records. Exit status 0 intact, "
        "1 something is not (each finding names the stream, seq and event id, or the log's partition and offset, "
        "the check that failed and why).")
    verify.add_argument("--checkpoint", type=Path, metavar="FILE", help="a signed checkpoint note of a log "
                        "partition, kept before")
    verify.add_argument("--key", metavar="KEY", help="with --checkpoint: the verifier key, or a file holding it "
                        "(default: the .pub beside RUNLEDGER_CHECKPOINT_KEY)")
    verify.add_argument("--json", action="store_true", help="print the report as one JSON object, no progress "
                        "bar")
    verify.add_argument("--no-record", action="store_true", help="do not keep the result in the verifications table "
                        "(which the integrity metrics and dashboard read)")
    checks = verify.add_subparsers(dest="check", metavar="CHECK")
    chains = checks.add_parser(
        "chains", help="every stream of audit_log, from its stored bytes",
        description="Reads audit_log in one snapshot, stream by stream in seq order, and recomputes each "
        "event's hash (SPEC.md section 3) from its stored bytes. A stream is reported at its first problem: "
        "not_json, invalid_event (an object with two members of one name: not I-JSON), hash_mismatch (the bytes "
        "were changed), row_mismatch (a column says something else than the "
        "bytes: rows swapped or edited), first_missing, seq_gap and seq_duplicate (rows deleted or added), "
        "chain_broken (a prevhash does not link), head_mismatch, head_missing and stream_missing (stream_heads "
        "does not end where the stored events do: an event deleted or forged at the end, or a whole stream "
        "deleted). A stream rewritten whole with a consistent new chain, heads included, is only caught against "
        "a checkpoint taken before.")
    chains.add_argument("--stream", metavar="ID", help="only this stream")
    chains.add_argument("--since", type=utc_time, metavar="TIME",
                        help="only streams with an event recorded (or a head moved) since TIME, e.g. "
                        "2026-11-22T10:00:00Z; each is checked whole")
    chains.add_argument("--no-record", action="store_true", default=argparse.SUPPRESS,
                     help="do not keep the result in the verifications table")
    chains.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the report as one JSON object, no progress bar")
    projection = checks.add_parser(
        "projection", help="the projection tables against what the rules give from audit_log",
        description="Reads one snapshot and, stream by stream, applies the projection rules to the stored events "
        "in seq order (costs priced with the catalog version their row names), then compares executions, "
        "steps, costs and artifacts with the rows the tables hold, column by column. Reports every row that "
        "differs (row_differs: the table, the row's key and the first differing column, stored and expected), "
        "is missing (row_missing), or that no stored event gives (row_extra), and every stream whose events the "
        "rules refuse (event_refused). A stream found intact is attested in a file of the verifier's: the "
        "digest of its stored events and rows. A later run computes each stream's digest in the database and "
        "derives again only the streams whose digest is not attested (new events, or rows or events changed "
        "since), so an hourly run costs little more than reading the tables once. Keep the file where whoever "
        "can change the tables cannot write; --full checks every stream without it.")
    projection.add_argument("--stream", metavar="ID", help="only this stream")
    projection.add_argument("--since", type=utc_time, metavar="TIME",
                            help="only streams with an event recorded since TIME, e.g. 2026-11-22T10:00:00Z; each "
                            "is checked whole (rows of streams with no event at all are then not looked for)")
    projection.add_argument("--attestations", type=Path, metavar="FILE",
                            help="the streams found intact before (default: <RUNLEDGER_STATE_DIR>/verified-"
                            "<RUNLEDGER_DB_SCHEMA>.json; created when missing)")
    projection.add_argument("--full", action="store_true",
                            help="derive and compare every stream, whatever the attestations say (and rewrite them)")
    projection.add_argument("--no-record", action="store_true", default=argparse.SUPPRESS,
                     help="do not keep the result in the verifications table")
    projection.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                            help="print the report as one JSON object, no progress bar")
    log = checks.add_parser(
        "log", help="the log topic from its records, and PostgreSQL against it",
        description="Reads every partition of the log topic (<prefix>.events) from its start up to where it "
        "ends when the check starts (producers may keep appending), and recomputes each event's hash (SPEC.md "
        "section 3) from the record's bytes, following each stream's chain as its events come: out of seq order "
        "(held until the predecessor comes) and more than once (a copy of an event already seen, same id and "
        "hash, is a producer's retry: counted, not reported). A stream is reported at its first problem, with the "
        "record's partition and offset: invalid_event (an object with two members of one name: not I-JSON), "
        "hash_mismatch (the bytes were changed), seq_duplicate (another event at "
        "a seq already taken: a fork), chain_broken (a prevhash does not link), first_missing and seq_gap (an "
        "event never came). A record that is not an event is not_json or not_event; a partition whose first "
        "records retention deleted is log_start_deleted, and the rest is still checked. Then PostgreSQL, from one "
        "snapshot taken before the log is read, partition by partition: audit_differs (an audit_log row is not, "
        "byte for byte, the record at the log position it records: an event edited, swapped or rewritten), "
        "audit_not_in_log (a row at a position the log has no record at: a forged event), leaf_index_wrong, "
        "record_unaccounted (a record before where the partition was projected to that is not in audit_log, "
        "not a duplicate of an event there, not a dead letter and not parked: an event deleted), "
        "tree_leaf_differs, tree_longer and tree_root_differs (the partition's stored transparency log is not the "
        "tree of its records). Exit status 2 if the topic does not exist.")
    log.add_argument("--no-database", action="store_true", help="check the log topic only")
    log.add_argument("--no-record", action="store_true", default=argparse.SUPPRESS,
                     help="do not keep the result in the verifications table")
    log.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                     help="print the report as one JSON object, no progress bar")
    verify.set_defaults(func=_cmd_verify)
    verify.set_defaults(usage=verify.format_usage, checks=", ".join(checks.choices))


def _cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.projections.postgres.verify import ChainReport, ProjectionReport, verify_chains, verify_projection

    if (args.check is None) == (args.checkpoint is None):
        print(f"{args.usage().strip()}\nrunledger verify: give either CHECK ({args.checks}) or --checkpoint FILE",
              file=sys.stderr)
        return EXIT_USAGE
    tune_gc()
    bar = tqdm(unit="ev", desc="verifying", disable=True if args.json else None, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    report: ChainReport
    try:
        if args.checkpoint is not None:
            from runledger.streams.tools.verifylog import verify_checkpoint

            checkpoint, partition = _open_checkpoint(args, settings)
            report = asyncio.run(verify_checkpoint(settings, checkpoint, partition, progress))
        elif args.check == "log":
            from runledger.streams.tools.verifylog import verify_log

            report = asyncio.run(verify_log(settings, progress, database=not args.no_database))
        elif args.check == "projection":
            attestations = args.attestations or settings.state_dir / f"verified-{settings.db_schema}.json"
            report = asyncio.run(verify_projection(settings.database_dsn(), settings.db_schema, stream=args.stream,
                                                   since=args.since, attestations=attestations, full=args.full,
                                                   progress=progress))
        else:
            report = asyncio.run(verify_chains(settings.database_dsn(), settings.db_schema, stream=args.stream,
                                               since=args.since, progress=progress))
    finally:
        bar.close()
    partial = getattr(args, "stream", None) is not None or getattr(args, "since", None) is not None
    if not args.no_record and not partial:  # a part found intact says nothing of the whole
        from runledger.projections.postgres.verify import record_verification

        check = "checkpoint" if args.checkpoint is not None else args.check
        try:
            asyncio.run(record_verification(settings.database_dsn(), settings.db_schema, check, report))
        except RunledgerError as e:
            print(f"note: {e}; the result is not kept for the metrics (--no-record skips this)", file=sys.stderr)
    if args.json:
        emit(report.as_dict())
    else:
        for f in report.findings:
            seq = f"seq {f.seq}" if f.seq is not None else "no seq"
            event = f" (event {f.event_id})" if f.event_id else ""
            where = f"{f.stream_id}  {seq}{event}" if f.stream_id else "the log"
            print(terminal_safe(f"NOT INTACT  {where}  {f.code}: {f.reason}"))  # both may quote a record
        rate = report.as_dict()
        if isinstance(report, ProjectionReport):
            if report.note:
                print(f"note: {report.note}")
            print(f"{report.derived_events:,} events of {report.derived_streams:,} streams derived and compared "
                  "row by row; the other streams' events and rows are as they were when found intact before")
        streams = f" of {report.streams:,} streams" if report.streams else ""
        print(f"{report.events:,} events{streams} checked in {report.seconds:.2f} s "
              f"({rate['events_per_s'] or 0:,} events/s; {rate['events_per_cpu_s'] or 0:,} per CPU second of this "
              f"process): " + ("intact" if report.intact else f"{len(report.findings)} findings"))
    return 0 if report.intact else EXIT_INVALID


def _open_checkpoint(args: argparse.Namespace, settings: Settings) -> tuple[Checkpoint, int]:
    """The checkpoint in ``--checkpoint``, its signature checked with the verifier key, and the partition of the log
    topic it is of (CheckpointError if it is of no partition of this deployment's log)."""
    from runledger.schemas.logtrees import partition_of
    from runledger.streams.tools.checkpoints import verifier_key

    checkpoint = Verifier(verifier_key(settings, args.key)).open(args.checkpoint.read_text())
    topic, partition = partition_of(checkpoint.origin, settings.checkpoint_origin)
    if topic != settings.events_topic:
        raise CheckpointError(f"the checkpoint is of topic {topic}, not of the log topic {settings.events_topic}")
    return checkpoint, partition
