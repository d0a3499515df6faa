"""``runledger dev up|down|status``: the embedded stack for laptops and tests, and the health of the workers."""

from __future__ import annotations

import argparse
import asyncio

from runledger.schemas.errors import RunledgerError
from runledger.streams.cli.common import Subparsers, emit
from runledger.streams.dev import devstack
from runledger.streams.settings import Settings

__all__ = ["register"]


def register(sub: Subparsers) -> None:
    dev = sub.add_parser("dev", help="start, stop or inspect the embedded stack (PostgreSQL, Kafka, Redis)",
                         description="The embedded stack for laptops and tests. State lives in "
                         "RUNLEDGER_STATE_DIR (default .runledger/). Services left out of "
                         "RUNLEDGER_EMBEDDED are external and never touched.")
    dev_sub = dev.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in [("up", "start what is not running yet (idempotent)"),
                         ("down", "stop what `up` started, nothing else"),
                         ("status", "show each service's state and URL")]:
        p = dev_sub.add_parser(action, help=text, description=text)
        p.add_argument("--json", action="store_true", help="one JSON object per service")
        if action == "down":
            p.add_argument("--purge", action="store_true", help="also delete the stored data")
    dev.set_defaults(func=_cmd_dev)


def _cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "up":
        services = devstack.up(settings)
    elif args.action == "down":
        services = devstack.down(settings, purge=args.purge)
    else:
        services = devstack.status(settings)
    for service in services:
        if args.json:
            emit(service.as_dict())
        else:
            pid = f"pid {service.pid}" if service.pid else ""
            detail = f"  {service.detail}" if service.detail else ""
            print(f"{service.name:<9} {service.state:<12} {service.url:<52} {pid}{detail}")
    postgres = next(s for s in services if s.name == "postgres")
    if args.action == "status" and postgres.state in ("running", "external"):
        _print_health(args, settings)
    return 0


def _print_health(args: argparse.Namespace, settings: Settings) -> None:
    """The workers of the group and the partitions they hold back (dev status)."""
    from runledger.streams.worker.logcheck import projection_health

    try:
        health = asyncio.run(projection_health(settings))
    except RunledgerError as e:
        health = {"error": str(e), "workers": [], "problems": []}
    if args.json:
        emit({"name": "projection", "schema": settings.db_schema, "group": settings.consumer_group, **health})
        return
    workers = health["workers"]
    print(f"{'workers':<9} {len(workers)} running in group {settings.consumer_group}"
          + "".join(f"; pid {w['pid']} on {w['host']}, partitions {w['partitions']}" for w in workers))
    for p in health["problems"]:
        print(f"{'STALLED':<9} partition {p['partition']} since {p['detected_at']}: {p['problem']}")
    if health.get("error"):
        print(f"{'workers':<9} unknown: {health['error']}")
