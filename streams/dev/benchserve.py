"""A ``runledger serve`` of its own for ``bench-http`` and the demo: started on a free port with a schema, topics,
sources key and source of its own, readied, and stopped (``stop_process``) with everything it made dropped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from runledger.projections.postgres.db import connect_one, migrate
from runledger.projections.postgres.queries import quote_schema
from runledger.streams.dev.benchhttp import Client, Target
from runledger.streams.dev.benchpaths import Progress
from runledger.streams.settings import Settings

__all__ = ["free_port", "own_serve", "stop_process", "until_ready"]


async def stop_process(process: subprocess.Popen[Any], grace_s: float = 30) -> bool:
    """SIGTERM ``process`` if it still runs, then SIGKILL after ``grace_s``; return once it has exited, True unless
    it had to be killed. The event loop goes on meanwhile."""
    if process.poll() is not None:
        return True
    process.terminate()
    try:
        await asyncio.to_thread(process.wait, grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        await asyncio.to_thread(process.wait)
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(**changes: str) -> dict[str, str]:
    """This process's environment with ``changes`` as RUNLEDGER_* settings: a child's."""
    return {**os.environ, **{f"RUNLEDGER_{k.upper()}": v for k, v in changes.items()}}


@contextlib.asynccontextmanager
async def own_serve(settings: Settings, progress: Progress, *, workers: int = 1) -> AsyncIterator[
        tuple[Target, Callable[[Target], Awaitable[None]]]]:
    """A ``serve`` of its own on a free port (a fresh schema, topics and sources key, one source granted every
    stream), and the step that readies the reads (a worker projects what was appended; a checkpoint is signed).
    Everything is stopped and the schema dropped afterwards."""
    from runledger.streams.dev import WORKER_COMMAND
    from runledger.streams.http.keys import init_key, load_key, new_credential
    from runledger.streams.http.sources import add_source
    from runledger.streams.topics import ensure_topics

    stamp = f"{time.strftime('%Y%m%d%H%M%S', time.gmtime())}{uuid.uuid4().hex[:4]}"
    keys = Path(tempfile.mkdtemp(prefix="rl-bench-http-"))
    changes = {"db_schema": f"benchhttp_{stamp}", "topic_prefix": f"benchhttp{stamp}",
               "consumer_group": f"benchhttp-{stamp}", "sources_key_file": str(keys / "sources.key"),
               "checkpoint_key": str(keys / "checkpoint.key"), "metrics_port": "0"}
    own = settings.model_copy(update={k: (Path(v) if k.endswith(("_file", "_key")) else
                                          int(v) if k == "metrics_port" else v) for k, v in changes.items()})
    env = child_env(**changes)
    await ensure_topics(own, {own.events_topic: own.event_partitions})
    await migrate(own.database_dsn(), own.db_schema)
    init_key(own)
    credential = new_credential("v1")
    conn = await connect_one(own.database_dsn(), own.db_schema)
    try:
        await add_source(conn, load_key(own), "bench-http", "/bench/http", append_prefixes=[""], read_prefixes=[""],
                         rate_per_s=1e9, burst=1_000_000_000, credential=credential)
    finally:
        await conn.close()
    port = free_port()
    log = (keys / "serve.log").open("wb")
    progress(f"starting runledger serve on port {port} (schema {own.db_schema}, log {keys / 'serve.log'}) ...")
    serve = subprocess.Popen([sys.executable, "-m", "runledger.streams.cli", "serve", "--port", str(port),
                              "--workers", str(workers)], env=env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
    worker: subprocess.Popen[bytes] | None = None
    target = Target(f"http://127.0.0.1:{port}", "bench-http", credential.shown, pid=serve.pid)
    try:
        await until_ready(target.url, serve, keys / "serve.log")

        async def ready_reads(t: Target) -> None:
            nonlocal worker
            from runledger.streams.tools.checkpoints import create_signer_key, sign_round

            worker = subprocess.Popen(WORKER_COMMAND, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
            await _until_projected(t, worker)
            await sign_round(own, create_signer_key(own))

        yield target, ready_reads
    finally:
        for process in (worker, serve):
            if process is not None:
                await stop_process(process)
        log.close()
        shutil.rmtree(keys, ignore_errors=True)  # its keys and serve's log (a failure quotes the log's end)
        admin = await asyncpg.connect(settings.database_dsn())
        try:
            await admin.execute(f"DROP SCHEMA IF EXISTS {quote_schema(own.db_schema)} CASCADE")
        finally:
            await admin.close()


async def until_ready(url: str, serve: subprocess.Popen[bytes], log: Path) -> None:
    import httpx

    deadline = time.monotonic() + 120
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            if serve.poll() is not None:
                raise RuntimeError(f"serve exited with {serve.returncode}: {log.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(url + "/readyz")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve was not ready within 120 s: {log.read_text(errors='replace')[-3000:]}")
            await asyncio.sleep(0.2)


async def _until_projected(target: Target, worker: subprocess.Popen[bytes], timeout: float = 600) -> None:
    """Until the worker has projected the events whose proofs the reads ask for (404 until then; 409 after, until a
    checkpoint covers them)."""
    client = Client(target, 4)
    deadline = time.monotonic() + timeout
    try:
        for stream, event_id in zip(target.streams, target.event_ids, strict=True):
            while await client.get(f"/v1/events/{event_id}/proof") == 404:
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker exited with {worker.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not project {stream} within {timeout:.0f} s")
                await asyncio.sleep(0.5)
    finally:
        await client.close()
