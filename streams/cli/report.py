"""``runledger report``: the dashboards' PostgreSQL panels as a static HTML page, for people without Grafana."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from runledger.streams.cli.common import Subparsers, utc_time
from runledger.streams.settings import Settings

__all__ = ["register"]


def register(sub: Subparsers) -> None:
    report = sub.add_parser(
        "report", help="the executions, cost and integrity panels as one static HTML page",
        description="Runs the panels of the executions, cost and integrity dashboards (the same SQL Grafana runs) "
        "in one snapshot of RUNLEDGER_DB_SCHEMA and writes them as one HTML file with inline SVG charts: no "
        "script, no network, to mail or archive. Prints the file's path.")
    report.add_argument("--html", type=Path, required=True, metavar="FILE", help="where to write the page")
    report.add_argument("--since", type=utc_time, metavar="TIME", help="the start of the time range the "
                        "executions and cost panels show, e.g. 2026-11-01T00:00:00Z (default: 30 days before "
                        "--until)")
    report.add_argument("--until", type=utc_time, metavar="TIME", help="its end (default: now)")
    report.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from runledger.streams.tools.htmlreport import write_report

    path = asyncio.run(write_report(settings, args.html, args.since, args.until))
    print(path.resolve())
    return 0
