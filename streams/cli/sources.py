"""``runledger sources``: the producers that may sign requests to ``runledger serve``, their grants and secrets.

Runs as the owner (RUNLEDGER_DATABASE_URL). A secret is printed once, when it is made (``add``, ``rotate``), and
stored only sealed with the sources key (RUNLEDGER_SOURCES_KEY_FILE: ``init-key`` writes it, as does the first
``add``). ``list`` never shows a secret. ``revoke`` holds on every replica once PostgreSQL's notification of it is
delivered: ``serve`` holds a source only while notified of no change (``runledger.streams.http.sourcecache``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from typing import Any

from runledger.streams.cli.common import Subparsers, emit
from runledger.streams.settings import Settings
from runledger.streams.terminal import terminal_safe

__all__ = ["parse_duration", "register"]

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds of ``90``, ``90s``, ``30m``, ``24h`` or ``7d``. Raises ValueError."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is no duration: write 90s, 30m, 24h or 7d")
    return float(match[1]) * _UNITS[match[2]]


def register(sub: Subparsers) -> None:
    sources = sub.add_parser(
        "sources", help="the sources that may sign requests to `runledger serve`: add, list, rotate, revoke",
        description="Each producer that appends or reads over HTTP is a source: an id (its requests' "
        "runledger-source header), the CloudEvents source the server writes into its events, the stream-id "
        "prefixes it may append to and read, a rate limit, and Standard Webhooks credentials. Runs as the owner.")
    sub_sources = sources.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub_sources.add_parser("init-key", help="write the sources key (RUNLEDGER_SOURCES_KEY_FILE, mode 0600) unless it "
                           "exists; give every serve replica the same file")
    add = sub_sources.add_parser("add", help="add a source; its secret is printed once")
    add.add_argument("source_id", metavar="ID", help="the source's id: letters, digits, . _ -, at most 100")
    add.add_argument("--source", required=True, metavar="URI", help="the CloudEvents source of its events")
    add.add_argument("--append-prefix", nargs="+", default=[], metavar="P", help="stream-id prefixes it may append "
                     "to (\"\" for every stream)")
    add.add_argument("--read-prefix", nargs="+", default=[], metavar="P", help="stream-id prefixes it may read")
    kind = add.add_mutually_exclusive_group()
    kind.add_argument("--asymmetric", action="store_true", help="an Ed25519 key pair (v1a): the private whsk_ key "
                      "is printed once and not kept; the server keeps the public one")
    kind.add_argument("--public-key", metavar="WHPK", help="v1a with a whpk_ public key the producer made (its "
                      "private key never leaves it)")
    add.add_argument("--rate", type=float, default=1000.0, metavar="N", help="events a second it may append, on "
                     "average (default 1000)")
    add.add_argument("--burst", type=int, default=2000, metavar="N", help="events it may append at once "
                     "(default 2000; a request of more is refused)")
    add.add_argument("--json", action="store_true", help="print the result as one JSON object")
    listing = sub_sources.add_parser("list", help="the sources, their grants and their credentials' dates "
                                     "(never a secret)")
    listing.add_argument("--json", action="store_true", help="one JSON object a line")
    rotate = sub_sources.add_parser("rotate", help="a new secret for a source, printed once; the old ones stay "
                                    "valid through the overlap")
    rotate.add_argument("source_id", metavar="ID")
    rotate.add_argument("--overlap", default="24h", metavar="DURATION", help="how long the secrets in use stay "
                        "valid (default 24h; 0: they end now)")
    rotate.add_argument("--public-key", metavar="WHPK", help="a v1a source: the producer's new whpk_ public key "
                        "(default: a new key pair, its private key printed once)")
    rotate.add_argument("--json", action="store_true", help="print the result as one JSON object")
    revoke = sub_sources.add_parser("revoke", help="revoke a source and all its secrets, at once")
    revoke.add_argument("source_id", metavar="ID")
    revoke.add_argument("--json", action="store_true", help="print the result as one JSON object")
    sources.set_defaults(func=_cmd_sources)


def _cmd_sources(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.http.keys import init_key

    if args.action == "init-key":
        path, written = init_key(settings)
        print(f"{'wrote' if written else 'kept the existing'} sources key {path}")
        return 0
    result = asyncio.run(_run(args, settings))
    if getattr(args, "json", False):
        for item in result if isinstance(result, list) else [result]:
            emit(item)
        return 0
    if args.action == "list":
        for item in result:
            state = "revoked" if item["revoked_at"] else "active"
            usable = [f"#{s['secret_no']} {s['scheme']}" + (f" until {s['expires_at']}" if s["expires_at"] else "")
                      for s in item["secrets"] if not s["revoked_at"]]
            print(terminal_safe(f"{item['source_id']}  {state}  source={item['source']}  "
                                f"append={item['append_prefixes']}  read={item['read_prefixes']}  "
                                f"rate={item['rate_per_s']:g}/s burst={item['burst']}  "
                                f"secrets: {', '.join(usable) or 'none'}"))
        return 0
    if args.action == "revoke":
        print(f"source {args.source_id}: revoked")
        return 0
    if result["secret"]:
        print(f"source {result['source_id']}: secret #{result['secret_no']} ({result['scheme']}), shown only now:")
        print(result["secret"])
    else:
        print(f"source {result['source_id']}: public key #{result['secret_no']} ({result['scheme']}) registered")
    if result.get("public_key"):
        print(f"its public key: {result['public_key']}")
    if args.action == "rotate":
        print(f"the secrets it had stay valid until {result['old_valid_until']}", file=sys.stderr)
    return 0


async def _run(args: argparse.Namespace, settings: Settings) -> Any:
    from runledger.projections.postgres.db import connect_one
    from runledger.streams.http import sources
    from runledger.streams.http.keys import (
        Credential,
        init_key,
        load_key,
        new_credential,
        public_key_credential,
    )

    conn = await connect_one(settings.database_dsn(), settings.db_schema, decode_jsonb=True)
    try:
        if args.action == "list":
            return await sources.list_sources(conn)
        if args.action == "revoke":
            await sources.revoke_source(conn, args.source_id)
            return {"source_id": args.source_id, "revoked": True}
        if args.action == "add":
            if args.rate <= 0 or args.burst < 1:
                raise ValueError("--rate must be above 0 and --burst at least 1")
            init_key(settings)  # the first add writes the key
            key = load_key(settings)
            credential: Credential = (public_key_credential(args.public_key) if args.public_key
                                      else new_credential("v1a" if args.asymmetric else "v1"))
            await sources.add_source(conn, key, args.source_id, args.source, append_prefixes=args.append_prefix,
                                     read_prefixes=args.read_prefix, rate_per_s=args.rate, burst=args.burst,
                                     credential=credential)
            return _shown(args.source_id, 1, credential)
        key = load_key(settings)
        record = [s for s in await sources.list_sources(conn) if s["source_id"] == args.source_id]
        schemes = {s["scheme"] for s in record[0]["secrets"]} if record else set()
        if args.public_key:
            credential = public_key_credential(args.public_key)
        else:
            credential = new_credential("v1a" if schemes == {"v1a"} else "v1")
        overlap_s = parse_duration(args.overlap)
        number = await sources.rotate_source(conn, key, args.source_id, credential, overlap_s)
        until = await conn.fetchval("SELECT now() + make_interval(secs => $1)", overlap_s)
        return {**_shown(args.source_id, number, credential), "old_valid_until": until.isoformat()}
    finally:
        await conn.close()


def _shown(source_id: str, number: int, credential: Any) -> dict[str, Any]:
    return {"source_id": source_id, "secret_no": number, "scheme": credential.scheme, "secret": credential.shown,
            "public_key": credential.kept if credential.scheme == "v1a" else None}
