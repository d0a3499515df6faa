"""The ``runledger`` command line: one subcommand per job, ``--json`` wherever a script may read.

Exit status: 0 done; 1 done, but some input was invalid (``hash``) or an event
was rejected (``wait``); 2 bad input or usage, nothing was done; 3 a service
failed (transient: try again); 4 timed out (``wait``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from runledger.schemas.errors import RunledgerError
from runledger.streams.cli import (
    checkpoint,
    demo,
    dev,
    dlq,
    events,
    heads,
    offsets,
    rebuild,
    report,
    serve,
    sources,
    trees,
    verify,
    webhooks,
    worker,
)
from runledger.streams.cli.common import EXIT_TRANSIENT, EXIT_USAGE
from runledger.streams.settings import Settings
from runledger.streams.terminal import escape_log_records, terminal_safe

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runledger",
        description="runledger: a hash-chained, event-sourced record of AI-agent workflow runs. "
        "Configuration comes from RUNLEDGER_* environment variables (see README).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The order of registration is the order `runledger --help` lists the commands in.
    for group in (dev, events, worker, dlq, heads, offsets, rebuild, trees, verify, checkpoint, report, serve, sources,
                  webhooks, demo):
        group.register(sub)
    return parser


def _schema_behind(e: Exception) -> bool:
    """Whether ``e`` is PostgreSQL's answer to a schema that lacks a table, column or function of this version
    (asyncpg is loaded only by the commands that need it: no import here)."""
    asyncpg = sys.modules.get("asyncpg")
    return asyncpg is not None and isinstance(e, (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError,
                                                  asyncpg.UndefinedFunctionError))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    escape_log_records()  # what records hold reaches no terminal and forges no log line, whoever logs it
    try:
        settings = Settings()
        return int(args.func(args, settings))
    except RunledgerError as e:
        print(f"runledger {args.command}: {terminal_safe(e)}", file=sys.stderr)
        return EXIT_TRANSIENT if e.transient else EXIT_USAGE
    except (OSError, ValueError) as e:
        print(f"runledger {args.command}: {terminal_safe(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if not _schema_behind(e):
            raise
        print(f"runledger {args.command}: the schema {terminal_safe(settings.db_schema)} is behind this version "
              f"({terminal_safe(e)}): run `runledger db migrate` first (or start a worker, which migrates)",
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"runledger {args.command}: interrupted", file=sys.stderr)
        return 130
