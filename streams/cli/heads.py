"""``runledger heads check|recover|repair|sweep``: the chain heads producers keep in Redis, against the log."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Any

from runledger.streams.cli.common import EXIT_INVALID, Subparsers, emit
from runledger.streams.settings import Settings
from runledger.streams.terminal import terminal_safe

if TYPE_CHECKING:
    from runledger.streams.producer.recovery import Recovered
    from runledger.streams.producer.repair import Repaired

__all__ = ["register"]


def register(sub: Subparsers) -> None:
    heads = sub.add_parser(
        "heads", help="the chain heads producers keep in Redis: check, recover, repair, sweep",
        description="Each stream's head (seq, hash) lives in Redis; an append stages its batch there before "
        "publishing it. If Redis loses its data or restarts, producers recover the heads from the log before they "
        "append again (never seq 1 for an existing stream), reading only what the log holds past the heads' "
        "checkpoints. `check` compares Redis, the log and PostgreSQL; `recover` recovers now; `repair` moves heads "
        "that are not on the log's first branch back onto it; `sweep` publishes every batch a producer staged but "
        "did not publish (it failed or died), as the elected producer or worker does every "
        "RUNLEDGER_PRODUCER_SWEEP_S seconds.")
    heads_sub = heads.add_subparsers(dest="action", required=True, metavar="ACTION")
    hcheck = heads_sub.add_parser("check", help="compare the heads in Redis, the log and PostgreSQL (exit status 1 "
                                  "on any disagreement)")
    hcheck.add_argument("--json", action="store_true", help="one JSON object per disagreement")
    hrecover = heads_sub.add_parser(
        "recover", help="move every head in Redis forward to the log's",
        description="Reads the log from the heads' checkpoints (with --full, from offset 0), follows each stream's "
        "chain as a worker does, moves each head in Redis forward to its end (never back), and marks the heads "
        "complete in this run of Redis. Waits for a recovery under way in another process first.")
    hrecover.add_argument("--full", action="store_true", help="read every partition from offset 0, not from the "
                          "checkpoints")
    hrecover.add_argument("--json", action="store_true", help="what was read and moved, as one JSON object")
    hrepair = heads_sub.add_parser(
        "repair", help="move heads that are not on the log's first branch back onto it",
        description="When the log holds two events at one seq of a stream (a fork), workers project the one that "
        "came first in the log and dead-letter the other branch. A head in Redis on the other branch (put there by "
        "an older recovery that chose by hash order) makes every append extend a branch no worker projects. "
        "`repair` reads the whole log, follows each stream as a worker does, and, under the stream's append lease, "
        "moves its head to the end of the first branch: back, if it is on another branch (a batch staged on that "
        "branch is dropped, and the idempotency keys of that branch's events are forgotten, so that a retry "
        "appends again), or forward, if it is behind on the first branch with nothing staged. It prints each head "
        "it moved; exit status 0 whether or not it moved any. Run `heads check` to see what it would move.")
    hrepair.add_argument("--stream", metavar="ID", help="repair this stream only (the log is still read whole, "
                         "its other streams skipped)")
    hrepair.add_argument("--json", action="store_true", help="one JSON object per head moved")
    sweep = heads_sub.add_parser("sweep", help="publish batches left staged now (whose lease has expired)")
    sweep.add_argument("--json", action="store_true", help="one JSON object per batch published")
    heads.set_defaults(func=_cmd_heads)


def _cmd_heads(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "check":
        return _check(args, settings)
    if args.action == "recover":
        return _recover(args, settings)
    if args.action == "repair":
        return _repair(args, settings)
    return _sweep(args, settings)


def _check(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.tools.heads import check_heads

    rows = asyncio.run(check_heads(settings))
    for row in rows:
        if args.json:
            emit(row)
        else:
            print(terminal_safe(f"{row['stream'] or '(all)'}: redis {row['redis']}, log {row['log']}, projected "
                                f"{row['projected']}: {'; '.join(row['problems'])}"))  # the log's streams
    if not args.json:
        print("heads agree" if not rows else f"{len(rows)} disagreements", file=sys.stderr)
    return EXIT_INVALID if rows else 0


def _recover(args: argparse.Namespace, settings: Settings) -> int:
    from redis.asyncio import Redis

    from runledger.streams.producer.epoch import redis_errors
    from runledger.streams.producer.recovery import recover_heads

    async def recover() -> Recovered | None:
        redis = Redis.from_url(settings.redis_dsn)
        try:
            with redis_errors("heads recover"):
                return await recover_heads(redis, settings, full=args.full, force=True)
        finally:
            await redis.aclose()

    done = asyncio.run(recover())
    assert done is not None  # forced: it recovers, whatever the epoch
    if args.json:
        emit({"records": done.records, "from": {str(p): o for p, o in sorted(done.starts.items())},
              "to": {str(p): o for p, o in sorted(done.ends.items())}, "streams": len(done.streams),
              "moved": len(done.moved)})
    else:
        print(f"read {done.records} records of the log ({'from offset 0' if args.full else 'from the checkpoints'}): "
              f"{len(done.streams)} streams, {len(done.moved)} heads moved forward in Redis")
    return 0


def _repair(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.producer.repair import repair_heads

    done = asyncio.run(repair_heads(settings, args.stream))
    for moved in done:
        if args.json:
            emit(_repaired_json(moved))
        else:
            print(_repaired_text(moved))
    if not args.json:
        print(f"{len(done)} heads moved" if done else "every head is at the end of the log's first branch",
              file=sys.stderr)
    return 0


def _repaired_json(r: Repaired) -> dict[str, Any]:
    return {"stream": r.stream, "from": {"seq": r.before.seq, "hash": r.before.hash},
            "to": {"seq": r.after.seq, "hash": r.after.hash}, "moved": "back" if r.back else "forward",
            "dropped_staged": None if r.dropped is None else {"first_seq": r.dropped[0], "last_seq": r.dropped[1]},
            "forgotten_keys": r.forgotten}


def _repaired_text(r: Repaired) -> str:
    text = (f"{r.stream}: moved {'back' if r.back else 'forward'} from seq {r.before.seq} ({r.before.hash}) to seq "
            f"{r.after.seq} ({r.after.hash}), the end of the log's first branch")
    if r.dropped is not None:
        text += f"; dropped the batch staged on the other branch (seq {r.dropped[0]}..{r.dropped[1]})"
    if r.forgotten:
        text += f"; forgot {r.forgotten} idempotency keys of the other branch's events"
    return text


def _sweep(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.producer.client import EventProducer

    async def sweep() -> list[tuple[str, int, int]]:
        async with EventProducer(settings.model_copy(update={"producer_sweep_s": 0})) as producer:
            return await producer.sweep()

    done = asyncio.run(sweep())
    for stream, first, last in done:
        if args.json:
            emit({"stream": stream, "first_seq": first, "last_seq": last})
        else:
            print(f"{stream}: published seq {first}..{last}")
    if not args.json:
        print(f"{len(done)} staged batches published", file=sys.stderr)
    return 0
