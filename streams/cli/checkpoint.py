"""The transparency log's commands: ``keys init|show`` (its signing key), ``checkpoint`` (a signed tree head, kept
in ``checkpoints`` and published to ``<prefix>.checkpoints``), ``prove`` and ``prove-consistency`` (proof
files), and ``verify-proof`` (checks one offline, with the verifier key alone)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from runledger.streams.cli.common import EXIT_INVALID, EXIT_USAGE, InputError, Subparsers, emit
from runledger.streams.settings import Settings
from runledger.streams.terminal import terminal_safe

if TYPE_CHECKING:
    from runledger.schemas.checkpoint import Signer

__all__ = ["register"]


def register(sub: Subparsers) -> None:
    keys = sub.add_parser(
        "keys", help="the Ed25519 key that signs the transparency log's checkpoints",
        description="The signer key lives in RUNLEDGER_CHECKPOINT_KEY (default <state dir>/checkpoint.key, mode "
        "0600) in the PRIVATE+KEY+<name>+<id>+<key> form of Go's sumdb/note; its verifier key, the only thing an "
        "auditor needs, is written beside it as <key>.pub. The key's name is RUNLEDGER_CHECKPOINT_ORIGIN.")
    keys_sub = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = keys_sub.add_parser("init", help="create the signer key and its verifier key")
    init.add_argument("--force", action="store_true", help="replace an existing key (checkpoints signed with it "
                      "can then only be checked with its old verifier key)")
    keys_sub.add_parser("show", help="print the verifier key, to hand to auditors")
    keys.set_defaults(func=_cmd_keys)
    checkpoint = sub.add_parser(
        "checkpoint", help="a signer round now: sign every log partition's tree that grew, and publish",
        description="Reads what was signed before from <prefix>.checkpoints, extends each partition's tree from "
        "there with the partition's new records read from Kafka (never from PostgreSQL), compares PostgreSQL's "
        "copy of each tree with it, and signs one C2SP tlog-checkpoint note per partition that grew (origin "
        "<RUNLEDGER_CHECKPOINT_ORIGIN>/<topic>/<partition>), all published to <prefix>.checkpoints together and "
        "kept in the checkpoints table. It never signs a checkpoint that contradicts one signed before. Prints "
        "the notes (or, with --json, one object). Exit 1 if a partition was refused or PostgreSQL disagreed.")
    checkpoint.add_argument("--out", type=Path, metavar="DIR", help="also write each note to "
                            "DIR/<topic>-<partition>-<size>.note")
    checkpoint.add_argument("--json", action="store_true", help="one JSON object instead of the notes")
    checkpoint.set_defaults(func=_cmd_checkpoint)
    signer = sub.add_parser(
        "signer", help="the signer as a process of its own: a round every RUNLEDGER_CHECKPOINT_INTERVAL_S",
        description="Runs `runledger checkpoint`'s round every RUNLEDGER_CHECKPOINT_INTERVAL_S seconds (default "
        "60) until stopped. Workers sign on the same interval unless RUNLEDGER_CHECKPOINT_INTERVAL_S=0 for them; "
        "an advisory lock keeps two rounds of one schema from running at once.")
    signer.add_argument("--interval", type=float, metavar="SECONDS", help="seconds between rounds (default: "
                        "RUNLEDGER_CHECKPOINT_INTERVAL_S, or 60 if that is 0)")
    signer.set_defaults(func=_cmd_signer)
    prove = sub.add_parser(
        "prove", help="an inclusion proof of one event under the newest checkpoint of its partition that covers it",
        description="Writes a JSON proof (format runledger-inclusion-proof/2, docs/proofs.md): the signed "
        "checkpoint of the event's log partition, the event's bytes as the log holds them, its partition, offset, "
        "leaf index and audit path. The proof is checked before it is written. `runledger verify-proof` (or an "
        "auditor's own code) checks it with the verifier key alone: no database, no Kafka.")
    prove.add_argument("event_id", metavar="EVENT_ID")
    prove.add_argument("--out", type=Path, metavar="FILE", help="write the proof to FILE (default: stdout)")
    prove.set_defaults(func=_cmd_prove)
    consistent = sub.add_parser(
        "prove-consistency", help="a proof that the log now extends a checkpoint kept before",
        description="Writes a JSON proof (format runledger-consistency-proof/1, docs/proofs.md) that the log of "
        "checkpoint NEW (default: the newest kept of OLD's partition) extends the log of checkpoint OLD: nothing "
        "before OLD's size was changed, removed or reordered. The proof is checked before it is written.")
    consistent.add_argument("old", type=Path, metavar="OLD", help="a checkpoint note file kept before")
    consistent.add_argument("new", type=Path, nargs="?", metavar="NEW", help="a later checkpoint note file")
    consistent.add_argument("--out", type=Path, metavar="FILE", help="write the proof to FILE (default: stdout)")
    consistent.set_defaults(func=_cmd_prove_consistency)
    check = sub.add_parser(
        "verify-proof", help="check a proof file offline, with the verifier key alone",
        description="Checks a runledger-inclusion-proof/2 (or /1) or runledger-consistency-proof/1 file: the "
        "checkpoint signatures against the verifier key, each checkpoint's origin, the event's hash from its bytes, "
        "and the RFC 9162 proof. Exit "
        "status 0 proven, 1 not (the message says which check failed). Needs no database and no Kafka.")
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument("--key", metavar="KEY", help="the verifier key, or a file holding it (default: the .pub "
                       "beside RUNLEDGER_CHECKPOINT_KEY)")
    check.add_argument("--origin", metavar="ORIGIN", help="the log whose checkpoints count: each must be of "
                       "<ORIGIN>/<topic>/<partition>, an inclusion proof's of its own partition (default: the "
                       "verifier key's name)")
    check.add_argument("--json", action="store_true", help="one JSON object")
    check.set_defaults(func=_cmd_verify_proof)


def _signer(settings: Settings) -> Signer:
    from runledger.streams.tools.checkpoints import checkpoint_signer

    signer = checkpoint_signer(settings)
    if signer is None:
        raise InputError(f"no checkpoint key at {settings.checkpoint_key_path}: create one with "
                         "`runledger keys init`")
    return signer


def _cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    path = settings.checkpoint_key_path
    if args.action == "show":
        print(_signer(settings).verifier_key)
        return 0
    if path.exists() and not args.force:
        print(f"runledger keys: {path} exists; --force replaces it", file=sys.stderr)
        return EXIT_USAGE
    from runledger.streams.tools.checkpoints import create_signer_key

    signer = create_signer_key(settings)
    print(f"wrote {path} (keep it secret) and {path}.pub:\n{signer.verifier_key}")
    return 0


def _cmd_checkpoint(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.tools.checkpoints import sign_round

    done = asyncio.run(sign_round(settings, _signer(settings)))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for s in done.signed:
            (args.out / f"{settings.events_topic}-{s.partition}-{s.checkpoint.size}.note").write_text(s.note)
    if args.json:
        emit({"signed": [{"partition": s.partition, "origin": s.checkpoint.origin, "size": s.checkpoint.size,
                          "root": s.checkpoint.root.hex(), "note": s.note} for s in done.signed],
              "refused": {str(p): why for p, why in done.refused.items()},
              "disagreements": [{"partition": p, "leaf": leaf, "offset": offset, "finding": what}
                                for p, leaf, offset, what in done.findings]})
    else:
        for s in done.signed:
            sys.stdout.write(s.note)
        if not done.signed:
            print("nothing to sign: no partition grew since its last checkpoint", file=sys.stderr)
        for p, why in done.refused.items():
            print(f"REFUSED partition {p}: {why}", file=sys.stderr)
        for p, leaf, _, what in done.findings:
            print(f"DISAGREES partition {p}{'' if leaf is None else f' leaf {leaf}'}: {what}", file=sys.stderr)
    return EXIT_INVALID if done.refused or done.findings else 0


def _cmd_signer(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.tools.checkpoints import run_signer

    interval = args.interval or settings.checkpoint_interval_s or 60.0
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_signer(settings, _signer(settings), interval))
    return 0


def _write(document: dict[str, object], out: Path | None) -> None:
    text = orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)


def _checked(document: dict[str, object], settings: Settings) -> int:
    """Write the proof only if it proves what it says (PostgreSQL's tree may have been rewritten since it was
    signed): checked with the verifier key beside the signer key."""
    from runledger.schemas.checkpoint import CheckpointError
    from runledger.schemas.merkle import ProofError
    from runledger.schemas.proofs import check_proof
    from runledger.streams.tools.checkpoints import verifier_key

    try:
        check_proof(document, verifier_key(settings, None))
    except (ProofError, CheckpointError) as e:
        print(f"runledger: the proof made from PostgreSQL's tree does not verify ({e}): the stored tree disagrees "
              "with what was signed; run `runledger verify log`", file=sys.stderr)
        return EXIT_INVALID
    return 0


def _cmd_prove(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.tools.checkpoints import prove_inclusion

    document = asyncio.run(prove_inclusion(settings, args.event_id))
    if status := _checked(document, settings):
        return status
    _write(document, args.out)
    return 0


def _cmd_prove_consistency(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.tools.checkpoints import prove_consistency

    old = args.old.read_text()
    new = args.new.read_text() if args.new else None
    document = asyncio.run(prove_consistency(settings, old, new))
    if status := _checked(document, settings):
        return status
    _write(document, args.out)
    return 0


def _cmd_verify_proof(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.schemas.checkpoint import CheckpointError
    from runledger.schemas.merkle import ProofError
    from runledger.schemas.proofs import check_proof
    from runledger.streams.tools.checkpoints import verifier_key

    key = verifier_key(settings, args.key)
    try:
        document = orjson.loads(args.file.read_bytes())
        proven = check_proof(document, key, args.origin)
    except (ProofError, CheckpointError, orjson.JSONDecodeError) as e:
        if args.json:
            emit({"proven": False, "reason": str(e)})
        else:
            print(terminal_safe(f"NOT PROVEN  {args.file}: {e}"))  # the file is anyone's
        return EXIT_INVALID
    cp = proven.checkpoint
    if args.json:
        emit({"proven": True, "kind": proven.kind, "origin": cp.origin, "size": cp.size, "root": cp.root.hex(),
              "event_id": proven.event_id, "leaf_index": proven.leaf_index,
              "old_size": proven.older.size if proven.older else None})
    elif proven.older is not None:
        print(terminal_safe(f"PROVEN  the log of {cp.origin} at size {cp.size:,} extends its log at size "
                            f"{proven.older.size:,}: nothing before it changed"))
    else:
        print(terminal_safe(f"PROVEN  event {proven.event_id} is leaf {proven.leaf_index:,} of {cp.origin} at size "
                            f"{cp.size:,}"))
    return 0
