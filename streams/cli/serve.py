"""``runledger serve``: the HTTP front door (``runledger.streams.http.app``) on uvicorn."""

from __future__ import annotations

import argparse

from runledger.streams.cli.common import Subparsers
from runledger.streams.settings import Settings

__all__ = ["register"]


def register(sub: Subparsers) -> None:
    serve = sub.add_parser(
        "serve", help="serve the HTTP API: signed appends from producers in any language, and reads",
        description="Runs the HTTP front door (docs/http.md) on uvicorn: stateless, any number of replicas behind a "
        "load balancer. Logs in to PostgreSQL as runledger_api (RUNLEDGER_DATABASE_API_PASSWORD_FILE), appends "
        "through Kafka and Redis as a producer, opens the sources' secrets with RUNLEDGER_SOURCES_KEY_FILE, and "
        "serves each process's metrics on RUNLEDGER_METRICS_PORT (the next free port per worker process).")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1; 0.0.0.0 "
                       "for every interface)")
    serve.add_argument("--port", type=int, default=8080, help="the port (default 8080)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument("--loglevel", default="warning", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import copy

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    # Plain formatters: the command line writes out every record's message already (terminal_safe), with no
    # arguments left for uvicorn's access formatter to take apart.
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["formatters"] = {name: {"format": "%(levelname)s: %(name)s: %(message)s"}
                                for name in log_config["formatters"]}
    # Each worker process reads its settings again (the factory), the same environment.
    uvicorn.run("runledger.streams.http.app:app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level=args.loglevel, proxy_headers=False, server_header=False,
                lifespan="on", log_config=log_config)
    return 0
