"""``runledger keys init|show`` and ``runledger checkpoint``: the transparency log's signing key, and signed
checkpoints of it (C2SP tlog-checkpoint notes) kept in ``checkpoints`` and published to ``<prefix>.checkpoints``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from runledger.schemas.checkpoint import Signer
from runledger.streams.cli.common import EXIT_USAGE, InputError, Subparsers, emit
from runledger.streams.settings import Settings

__all__ = ["load_signer", "register"]


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
        "checkpoint", help="sign the transparency log's tree head now, keep it and publish it",
        description="Reads the tree size and root in one snapshot, signs them as a C2SP tlog-checkpoint note, "
        "keeps the note in the checkpoints table and publishes it to <prefix>.checkpoints. Prints the note "
        "(or, with --json, its id, size, root and note). Keep a copy: `runledger verify --checkpoint FILE` and "
        "`runledger prove-consistency` show later that the log extends it.")
    checkpoint.add_argument("--out", type=Path, metavar="FILE", help="also write the note to FILE")
    checkpoint.add_argument("--json", action="store_true", help="one JSON object instead of the note")
    checkpoint.set_defaults(func=_cmd_checkpoint)


def load_signer(settings: Settings) -> Signer:
    path = settings.checkpoint_key_path
    try:
        return Signer.from_private_key(path.read_text())
    except FileNotFoundError:
        raise InputError(f"no checkpoint key at {path}: create one with `runledger keys init`") from None


def _cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    path = settings.checkpoint_key_path
    if args.action == "show":
        print(load_signer(settings).verifier_key)
        return 0
    if path.exists() and not args.force:
        print(f"runledger keys: {path} exists; --force replaces it", file=sys.stderr)
        return EXIT_USAGE
    signer = Signer.generate(settings.checkpoint_origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(signer.private_key + "\n")
    path.with_name(path.name + ".pub").write_text(signer.verifier_key + "\n")
    print(f"wrote {path} (keep it secret) and {path}.pub:\n{signer.verifier_key}")
    return 0


def _cmd_checkpoint(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.tools.checkpoints import publish_checkpoint

    kept = asyncio.run(publish_checkpoint(settings, load_signer(settings)))
    if args.out:
        args.out.write_text(kept.note)
    if args.json:
        emit({"id": kept.id, "origin": kept.checkpoint.origin, "size": kept.checkpoint.size,
              "root": kept.checkpoint.root.hex(), "signed_at": kept.signed_at, "note": kept.note})
    else:
        sys.stdout.write(kept.note)
    return 0
