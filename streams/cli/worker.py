"""``runledger db``, ``runledger worker`` and ``runledger wait``: the projection schema, the worker that fills it,
and waiting for an event to reach it."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

from runledger.streams.cli.common import EXIT_INVALID, EXIT_TIMEOUT, EXIT_TRANSIENT, Subparsers, emit
from runledger.streams.settings import Settings
from runledger.streams.terminal import terminal_safe

__all__ = ["register"]


def register(sub: Subparsers) -> None:
    db = sub.add_parser("db", help="database administration",
                        description="Database administration of the projection schema (RUNLEDGER_DB_SCHEMA).")
    db_sub = db.add_subparsers(dest="action", required=True, metavar="ACTION")
    db_sub.add_parser("migrate", help="apply the migrations in sql/migrations that the schema lacks (idempotent, "
                      "safe from several processes at once)")
    db_sub.add_parser("roles", help="as the superuser (RUNLEDGER_DATABASE_ADMIN_USER), create or update the login "
                      "of each component with its password from its secret file (idempotent: run it again after "
                      "changing a password)",
                      description="Runs sql/roles.sql: the logins runledger_owner, runledger_worker, "
                      "runledger_producer and grafana (a member of runledger_reader), their passwords from "
                      "RUNLEDGER_DATABASE_PASSWORD_FILE, RUNLEDGER_DATABASE_{WORKER,PRODUCER,READER}_PASSWORD_FILE, "
                      "none of them able to SET ROLE to another; the advisory lock functions for the owner and "
                      "the workers only. `runledger dev up` does the same for the embedded stack.")
    db.set_defaults(func=_cmd_db)

    topics = sub.add_parser("topics", help="create runledger's Kafka topics",
                            description="`runledger topics create` creates the log (<prefix>.events, "
                            "RUNLEDGER_EVENT_PARTITIONS partitions), its retry topics, the dead-letter topic and "
                            "<prefix>.checkpoints, each kept for ever (retention.ms=-1), if they do not exist yet. "
                            "A worker and a producer do the same when they start; run it once before them to "
                            "choose the partitions (the most workers that can share the log).")
    topics_sub = topics.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = topics_sub.add_parser("create", help="create the topics that do not exist yet (idempotent)")
    create.add_argument("--json", action="store_true", help="print the topics as one JSON object")
    topics.set_defaults(func=_cmd_topics)

    worker = sub.add_parser("worker", help="run a projection worker (Faust); several share the log's partitions",
                            description="Consumes <prefix>.events in batches and projects every event into "
                            "PostgreSQL, one transaction per batch, offsets stored with the rows. Run several "
                            "with the same RUNLEDGER_CONSUMER_GROUP to share the partitions. Stop with Ctrl-C.")
    worker.add_argument("--loglevel", default="warning", choices=["debug", "info", "warning", "error"])
    worker.set_defaults(func=_cmd_worker)

    wait = sub.add_parser("wait", help="wait until an event is projected (read-your-writes)",
                          description="Returns once event SEQ of STREAM is projected into the tables, or says why "
                          "it is not: rejected (with the reason) or timed out (with what it waits for). Exit "
                          "status 0 projected, 1 rejected, 4 timed out, 3 PostgreSQL unreachable or the stream's "
                          "partition stalled (the log no longer matches the projection: see `runledger offsets`).")
    wait.add_argument("stream", help="the stream id (the event's subject)")
    wait.add_argument("seq", type=int, help="the event's seq")
    wait.add_argument("--id", help="the event id: only this event counts (another event at the same seq "
                      "does not end the wait)")
    wait.add_argument("--timeout", type=float, default=30.0, metavar="S", help="give up after S seconds (default 30)")
    wait.add_argument("--json", action="store_true", help="print the result as one JSON object")
    wait.set_defaults(func=_cmd_wait)


def _cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "roles":
        from runledger.projections.postgres.roles import create_roles

        passwords = settings.role_passwords()
        asyncio.run(create_roles(settings.database_dsn("admin"), settings.db_schema, passwords))
        print(f"roles {', '.join(passwords)}: up to date")
        return 0
    from runledger.projections.postgres.db import migrate

    applied = asyncio.run(migrate(settings.database_dsn(), settings.db_schema))
    print(f"schema {settings.db_schema}: " + (f"applied {', '.join(applied)}" if applied else "up to date"))
    return 0


def _cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.topics import ensure_topics, topic_configs, webhook_topics, worker_topics

    wanted = {**worker_topics(settings), **webhook_topics(settings)}
    asyncio.run(ensure_topics(settings, wanted))
    if args.json:
        emit({"topics": wanted})
    else:
        for name, partitions in wanted.items():
            kept = topic_configs(settings, name)["retention.ms"]
            print(f"{name}: {partitions} partitions, kept "
                  + ("for ever" if kept == "-1" else f"{int(kept) / 1000:,.0f} s"))
    return 0


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.topics import check_log_topic, ensure_topics, worker_topics
    from runledger.streams.worker.app import check_schema, create_app

    # Before Faust starts: a worker may start before any producer, and the retry topics need the
    # log's partition count and their retention, not Faust's defaults. A log that deletes records: no worker;
    # nor a schema its login cannot reach or that lacks a migration.
    asyncio.run(ensure_topics(settings, worker_topics(settings)))
    asyncio.run(check_log_topic(settings))
    asyncio.run(check_schema(settings))
    metrics_url = None
    if settings.metrics_port:
        from runledger.streams.metrics import declare, serve
        from runledger.streams.worker.retry import delay_name

        declare(delay_name(d) for d in settings.retry_delays)

        try:
            port = serve(settings.metrics_host, settings.metrics_port)
        except OSError as e:  # no metrics is no reason not to project
            print(f"runledger worker: no Prometheus metrics: cannot serve them on {settings.metrics_host}: {e}",
                  file=sys.stderr, flush=True)
        else:
            host = socket.gethostname() if settings.metrics_host in ("0.0.0.0", "::") else settings.metrics_host  # noqa: S104
            metrics_url = f"http://{host}:{port}/metrics"
            print(f"runledger worker: Prometheus metrics at {metrics_url}", file=sys.stderr, flush=True)
    app = create_app(settings, metrics_url=metrics_url)
    worker = app.Worker(loglevel=args.loglevel, quiet=True)
    worker.execute_from_commandline()
    return 0


def _cmd_wait(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.projections.postgres.wait import wait_projected

    result = asyncio.run(wait_projected(settings.database_dsn("producer"), settings.db_schema, args.stream, args.seq,
                                        event_id=args.id, timeout=args.timeout, group_id=settings.consumer_group,
                                        topic=settings.events_topic,
                                        note=lambda text: print(f"note: {text}; waiting anyway", file=sys.stderr)))
    if args.json:
        emit(result.as_dict())
    elif result.status == "projected":
        print(f"projected: {result.stream_id} seq {result.seq} (event {result.event_id}, hash {result.hash}) "
              f"after {result.waited_s:.3f} s")
    elif result.status == "rejected":  # the letter's id and error come from the record
        print(terminal_safe(f"rejected: {result.stream_id} seq {result.seq} (event {result.event_id}): "
                            f"{result.reason}: {result.error} (see `runledger dlq show {result.dead_letter_id}`)"))
    elif result.status == "stalled":
        print(f"stalled: {result.stream_id} seq {result.seq} is not projected: {result.error}")
    else:
        print(f"timed out after {result.waited_s:.1f} s: {result.stream_id} seq {result.seq} is {result.error}")
    return {"projected": 0, "rejected": EXIT_INVALID, "stalled": EXIT_TRANSIENT}.get(result.status, EXIT_TIMEOUT)
