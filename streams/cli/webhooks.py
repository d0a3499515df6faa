"""``runledger webhooks``: the endpoints runledger delivers events to, their filters, secrets and state.

Runs as the owner (RUNLEDGER_DATABASE_URL). A signing secret (Standard Webhooks ``whsec_``) is printed once, when
it is made (``add``, ``rotate-secret``), and stored only sealed with the sources key (RUNLEDGER_SOURCES_KEY_FILE,
written by the first ``add`` if missing). ``list`` and ``show`` never show a secret. docs/webhooks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from runledger.streams.cli.common import EXIT_USAGE, InputError, Subparsers, confirm, emit
from runledger.streams.cli.sources import parse_duration
from runledger.streams.settings import Settings
from runledger.streams.terminal import terminal_safe

__all__ = ["register"]

STATE_CHOICES = ("pending", "retrying", "delivered", "dead")


def register(sub: Subparsers) -> None:
    hooks = sub.add_parser(
        "webhooks", help="the endpoints events are delivered to: add, list, show, rotate-secret, ping, disable, "
        "enable, remove",
        description="A webhook endpoint gets the events that match its filter (types, a stream-id prefix, a "
        "CloudEvents source), each POSTed as stored and signed per Standard Webhooks with the endpoint's secret. "
        "URLs are https to public addresses only, unless RUNLEDGER_WEBHOOK_ALLOW_PRIVATE=true (development). Runs "
        "as the owner.")
    actions = hooks.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add an endpoint; its signing secret is printed once")
    add.add_argument("url", metavar="URL", help="where to POST the deliveries (https://...)")
    add.add_argument("--types", metavar="T,...", help="only events of these types (default: every type)")
    add.add_argument("--streams", default="", metavar="PREFIX", help="only streams whose id starts with PREFIX")
    add.add_argument("--source", metavar="S", help="only events of this CloudEvents source")
    add.add_argument("--id", dest="endpoint_id", metavar="ID", help="the endpoint's id (default: wh_ and 16 hex "
                     "digits)")
    add.add_argument("--json", action="store_true", help="print the result as one JSON object")
    listing = actions.add_parser("list", help="the endpoints, their filters, state and secrets' dates (never a "
                                 "secret)")
    listing.add_argument("--json", action="store_true", help="one JSON object a line")
    show = actions.add_parser("show", help="one endpoint (never its secret)")
    show.add_argument("endpoint_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print it as one JSON object")
    rotate = actions.add_parser("rotate-secret", help="a new signing secret, printed once; deliveries carry a "
                                "signature by the old ones too through the overlap")
    rotate.add_argument("endpoint_id", metavar="ID")
    rotate.add_argument("--overlap", default="24h", metavar="DURATION", help="how long the secrets in use stay "
                        "valid (default 24h; 0: they end now)")
    rotate.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ping = actions.add_parser("ping", help="POST a signed runledger.webhook.ping event to an endpoint now and print "
                              "what it answered (exit 1 unless 2xx)")
    ping.add_argument("endpoint_id", metavar="ID")
    ping.add_argument("--timeout", type=float, default=15.0, metavar="S", help="the attempt's timeout (default 15)")
    ping.add_argument("--json", action="store_true", help="print the result as one JSON object")
    for name, text in (("disable", "stop delivering to an endpoint (what matches meanwhile waits for enable)"),
                       ("enable", "deliver to an endpoint again, what it missed first, in order"),
                       ("remove", "stop delivering to an endpoint for good (its deliveries' history stays)")):
        action = actions.add_parser(name, help=text)
        action.add_argument("endpoint_id", metavar="ID")
        if name == "disable":
            action.add_argument("--reason", default="disabled by an operator", help="why (shown by list and show)")
        action.add_argument("--json", action="store_true", help="print the result as one JSON object")
    deliveries = actions.add_parser(
        "deliveries", help="the messages owed to endpoints and what became of them (pending, retrying, delivered, "
        "dead), with their last attempt", description="One line per message (an event owed to an endpoint), in "
        "(endpoint, stream, seq) order, with its state, its attempts and the last one's answer. --attempts shows "
        "every attempt: when, the status, the latency, the first KiB of the answer, the error.")
    replay = actions.add_parser(
        "replay", help="send delivered or dead messages again (dry run first; audited; idempotent)",
        description="Makes the messages chosen owed again: the delivery worker holding their log partition sends "
        "them in seq order, before anything later of their stream to that endpoint, with the same webhook-id and "
        "their retries counted afresh. Choose messages by id, or --endpoint with --status (default dead), "
        "--stream, --from-seq/--to-seq and --since. A message still pending or retrying is left as it is, so a "
        "replay run twice sends once. Each replay is kept in webhook_replays (who, which filter, which messages). "
        "Exit 0 replayed (or nothing to), 2 refused.")
    for p in (deliveries, replay):
        if p is replay:
            p.add_argument("ids", nargs="*", metavar="MSG_ID", help="these messages (msg_..., the webhook-id)")
        p.add_argument("--endpoint", metavar="ID", help="only this endpoint's messages")
        p.add_argument("--status", action="append", choices=STATE_CHOICES, metavar="STATE",
                       help="only messages in this state: pending, retrying, delivered, dead (repeatable)"
                       + ("; default dead" if p is replay else ""))
        p.add_argument("--stream", metavar="ID", help="only this stream's messages")
        p.add_argument("--from-seq", type=int, metavar="N", help="only seq N and later")
        p.add_argument("--to-seq", type=int, metavar="N", help="only seq N and earlier")
        p.add_argument("--since", metavar="TIME", help="only messages owed at or after TIME: 2h, 30m, 1d or RFC 3339")
        p.add_argument("--limit", type=int, default=1000, metavar="N", help="at most N messages (default 1000)")
        p.add_argument("--json", action="store_true", help="one JSON object a line")
    deliveries.add_argument("--attempts", action="store_true", help="every attempt of each message")
    replay.add_argument("--dry-run", action="store_true", help="show what would be sent again; change nothing")
    replay.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    worker = actions.add_parser(
        "worker", help="run a delivery worker (Faust): sends the matching events of the log to the endpoints",
        description="Reads <prefix>.events in its own consumer group (<RUNLEDGER_CONSUMER_GROUP>.webhooks) and POSTs "
        "each event that matches an endpoint, as stored and signed, each stream's events to one endpoint in seq "
        "order. A failure is retried through <prefix>.webhooks.retry.<delay> (RUNLEDGER_WEBHOOK_RETRY_DELAYS) and "
        "ends in <prefix>.webhooks.dlq; every attempt is kept (`runledger webhooks deliveries`). Logs in as "
        "runledger_worker and opens the secrets with RUNLEDGER_SOURCES_KEY_FILE. Run several to share the log's "
        "partitions. Stop with Ctrl-C.")
    worker.add_argument("--loglevel", default="warning", choices=["debug", "info", "warning", "error"])
    hooks.set_defaults(func=_cmd_webhooks)


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.http.keys import load_key
    from runledger.streams.topics import check_log_topic, ensure_topics, webhook_topics, worker_topics
    from runledger.streams.webhooks.app import create_app
    from runledger.streams.worker.app import check_schema

    load_key(settings)  # it opens the endpoints' secrets: a missing or unreadable key is said before anything runs
    asyncio.run(ensure_topics(settings, {**worker_topics(settings), **webhook_topics(settings)}))
    asyncio.run(check_log_topic(settings))
    asyncio.run(check_schema(settings))
    if settings.metrics_port:
        from runledger.streams.metrics import declare_webhooks, serve

        declare_webhooks()
        try:
            port = serve(settings.metrics_host, settings.metrics_port)
        except OSError as e:
            print(f"runledger webhooks worker: no Prometheus metrics: {e}", file=sys.stderr, flush=True)
        else:
            print(f"runledger webhooks worker: Prometheus metrics on port {port}", file=sys.stderr, flush=True)
    app = create_app(settings)
    app.Worker(loglevel=args.loglevel, quiet=True).execute_from_commandline()
    return 0


def _selection(args: argparse.Namespace) -> Any:
    from runledger.streams.tools.dlq import parse_time
    from runledger.streams.webhooks.replay import Selection

    ids = tuple(getattr(args, "ids", ()) or ())
    states = tuple(args.status or (("dead",) if args.action == "replay" and not ids else ()))
    if args.action == "replay" and not ids and args.endpoint is None:
        raise InputError("replay: name messages (MSG_ID ...) or an endpoint (--endpoint ID)")
    if args.limit < 1:
        raise InputError(f"--limit: at least 1, not {args.limit}")
    return Selection(ids, args.endpoint, states, args.stream, args.from_seq, args.to_seq,
                     parse_time(args.since) if args.since else None, args.limit)


def _cmd_deliveries(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.webhooks.replay import select_messages

    sel = _selection(args)
    rows = asyncio.run(_with_owner(settings, lambda conn: select_messages(conn, sel, attempts=args.attempts)))
    for m in rows:
        if args.json:
            emit(m)
            continue
        last = (f"last: {m['last_status'] or 'no answer'}" + (f" ({m['last_error']})" if m["last_error"] else "")
                if m["last_attempt_at"] else "not attempted yet")
        print(terminal_safe(f"{m['msg_id']}  {m['endpoint_id']}  {m['stream_id']} seq {m['seq']}  {m['event_type']}  "
                            f"{m['state']}  attempts {m['attempts']}  {last}"))
        for a in m.get("attempts_made", []):
            print(terminal_safe(f"    #{a['attempt']} {a['attempted_at']}  {a['status'] or 'no answer'}  "
                                f"{a['latency_ms']:.0f} ms  {a['outcome']}" + (f"  {a['error']}" if a["error"] else "")
                                + (f"  answered {a['response']!r}" if a["response"] else "")))
    if not args.json:
        print(f"{len(rows)} messages" + (f" (--limit {args.limit} reached)" if len(rows) == args.limit else ""),
              file=sys.stderr)
    return 0


def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.webhooks.replay import replay, select_messages

    sel = _selection(args)
    rows = asyncio.run(_with_owner(settings, lambda conn: select_messages(conn, sel)))
    owed = [m for m in rows if m["state"] in ("pending", "retrying")]
    chosen = [m for m in rows if m["state"] in ("delivered", "dead")]
    for m in owed:
        print(terminal_safe(f"{m['msg_id']}: {m['state']}, owed already: left as it is"), file=sys.stderr)
    if not chosen:
        print("no delivered or dead message matches: nothing to replay", file=sys.stderr)
        if args.json:
            emit({"replayed": [], "replay_id": None, "dry_run": args.dry_run})
        return 0
    streams = len({(m["endpoint_id"], m["stream_id"]) for m in chosen})
    what = f"{len(chosen)} messages of {streams} (endpoint, stream) pairs"
    print(("dry run, nothing changes: would send again " if args.dry_run else "sending again ") + what,
          file=sys.stderr)
    for m in chosen:
        print(terminal_safe(f"  {m['msg_id']}  {m['endpoint_id']}  {m['stream_id']} seq {m['seq']}  {m['state']}"),
              file=sys.stderr)
    if args.dry_run:
        if args.json:
            emit({"replayed": [m["msg_id"] for m in chosen], "replay_id": None, "dry_run": True})
        return 0
    if not (args.yes or confirm(f"Send {len(chosen)} messages again?")):
        print("nothing replayed", file=sys.stderr)
        return EXIT_USAGE
    done, replay_id = asyncio.run(_with_owner(settings, lambda conn: replay(conn, [m["msg_id"] for m in chosen],
                                                                            sel)))
    if args.json:
        emit({"replayed": done, "replay_id": replay_id, "dry_run": False})
    else:
        print(f"replay {replay_id}: {len(done)} messages owed again; the delivery workers send them in seq order"
              if done else "nothing replayed: every message chosen is owed already")
    return 0


async def _with_owner(settings: Settings, work: Any) -> Any:
    from runledger.projections.postgres.db import connect_one

    conn = await connect_one(settings.database_dsn(), settings.db_schema, decode_jsonb=True)
    try:
        return await work(conn)
    finally:
        await conn.close()


def _cmd_webhooks(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "worker":
        return _cmd_worker(args, settings)
    if args.action == "deliveries":
        return _cmd_deliveries(args, settings)
    if args.action == "replay":
        return _cmd_replay(args, settings)
    result = asyncio.run(_run(args, settings))
    if args.action == "ping":
        if args.json:
            emit(result)
        else:
            print(terminal_safe(f"endpoint {args.endpoint_id}: {result['status'] or 'no answer'} in "
                                f"{result['seconds'] * 1000:.0f} ms from {result['address']}"
                                + (f": {result['error']}" if result["error"] else "")
                                + (f"; it answered {result['response']!r}" if result["response"] else "")))
        return 0 if result["ok"] else 1
    if args.json:
        for item in result if isinstance(result, list) else [result]:
            emit(item)
        return 0
    if args.action in ("list", "show"):
        for item in result:
            state = "enabled" if item["enabled"] else f"disabled ({item['disabled_reason']})"
            secrets = ", ".join(f"#{s['secret_no']}" + (f" until {s['expires_at']}" if s["expires_at"] else "")
                                for s in item["secrets"])
            print(terminal_safe(f"{item['endpoint_id']}  {state}  {item['url']}  types={item['types'] or 'all'}  "
                                f"streams={item['stream_prefix'] or 'all'}  source={item['source'] or 'any'}  "
                                f"secrets: {secrets or 'none'}"))
        return 0
    if args.action in ("add", "rotate-secret"):
        print(f"endpoint {result['endpoint_id']}: signing secret #{result['secret_no']}, shown only now:")
        print(result["secret"])
        return 0
    print(f"endpoint {args.endpoint_id}: {args.action}d")
    return 0


async def _run(args: argparse.Namespace, settings: Settings) -> Any:
    from runledger.projections.postgres.db import connect_one
    from runledger.streams.http.keys import init_key, load_key
    from runledger.streams.webhooks import endpoints
    from runledger.streams.webhooks.endpoints import Filter, parse_types

    conn = await connect_one(settings.database_dsn(), settings.db_schema, decode_jsonb=True)
    try:
        if args.action == "list":
            return await endpoints.list_endpoints(conn)
        if args.action == "show":
            return await endpoints.list_endpoints(conn, args.endpoint_id)
        if args.action == "add":
            flt = Filter(parse_types(args.types), args.streams, args.source)
            init_key(settings)  # the first secret sealed writes the key if no source did
            return await endpoints.add_endpoint(conn, load_key(settings), args.url, flt,
                                                allow_private=settings.webhook_allow_private,
                                                endpoint_id=args.endpoint_id)
        if args.action == "ping":
            return await _ping(conn, settings, args.endpoint_id, args.timeout)
        if args.action == "rotate-secret":
            return await endpoints.rotate_secret(conn, load_key(settings), args.endpoint_id,
                                                 parse_duration(args.overlap))
        if args.action in ("disable", "enable"):
            await endpoints.set_enabled(conn, args.endpoint_id, args.action == "enable", getattr(args, "reason", None))
        else:
            await endpoints.remove_endpoint(conn, args.endpoint_id)
        return {"endpoint_id": args.endpoint_id, "action": args.action}
    finally:
        await conn.close()


async def _ping(conn: Any, settings: Settings, endpoint_id: str, timeout_s: float) -> dict[str, Any]:
    from runledger.streams.http.keys import load_key
    from runledger.streams.webhooks.endpoints import delivery_secrets
    from runledger.streams.webhooks.ping import ping

    url, secrets = await delivery_secrets(conn, load_key(settings), endpoint_id)
    return await ping(endpoint_id, url, secrets, settings, timeout_s=timeout_s)
