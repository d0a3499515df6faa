"""The demo's HTTP producers: part of the fleet appended through ``runledger serve`` with signed requests, as a
producer in another language would (docs/http.md).

``HttpFleet`` starts ``serve`` as a subprocess on a free port of this host (its log in ``<state dir>/serve.log``),
adds a source of its own (revoked when the demo ends), and appends each execution's events as one signed
``POST /v1/streams/{stream}/events`` (Standard Webhooks v1, signed with the ``standardwebhooks`` package).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from runledger.projections.postgres.db import connect_one
from runledger.schemas.errors import PermanentError, TransientError
from runledger.streams.dev.benchserve import free_port, stop_process, until_ready
from runledger.streams.dev.fleet import Execution
from runledger.streams.producer.events import NewEvent, _wire_data
from runledger.streams.settings import Settings

__all__ = ["HttpAppended", "http_fleet"]


@dataclass(frozen=True)
class HttpAppended:
    executions: int
    events: int
    requests: int
    source_id: str
    url: str


def _body(events: Sequence[NewEvent]) -> bytes:
    return orjson.dumps([{"type": e.type, "data": _wire_data(e.data),
                          **({"time": e.time.astimezone(UTC).isoformat().replace("+00:00", "Z")} if e.time else {}),
                          **({"idempotency_key": e.idempotency_key} if e.idempotency_key else {})} for e in events])


@contextlib.asynccontextmanager
async def http_fleet(settings: Settings, run_tag: str) -> AsyncIterator[Any]:
    """A running ``serve`` and a source of its own; yields ``append(executions) -> HttpAppended``."""
    import httpx
    from standardwebhooks.webhooks import Webhook

    from runledger.streams.http.keys import init_key, load_key, new_credential
    from runledger.streams.http.sources import add_source, revoke_source

    init_key(settings)
    source_id = f"demo-{uuid.uuid4().hex[:10]}"
    credential = new_credential("v1")
    conn = await connect_one(settings.database_dsn(), settings.db_schema)
    try:
        await add_source(conn, load_key(settings), source_id, f"/demo/http/{source_id}", append_prefixes=[""],
                         read_prefixes=[""], rate_per_s=100_000.0, burst=100_000, credential=credential)
    finally:
        await conn.close()
    port = free_port()
    log_path = settings.state_dir / "serve.log"
    log = log_path.open("ab")
    serve = subprocess.Popen([sys.executable, "-m", "runledger.streams.cli", "serve", "--port", str(port)],
                             env={**os.environ, "RUNLEDGER_METRICS_PORT": "0"}, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    webhook = Webhook(credential.shown)
    try:
        await until_ready(url, serve, log_path)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            slots = asyncio.Semaphore(8)

            async def one(run: Execution) -> int:
                body = _body(run.events)
                msg_id, now = f"msg_{uuid.uuid4().hex}", datetime.now(UTC)
                headers = {"content-type": "application/json", "runledger-source": source_id, "webhook-id": msg_id,
                           "webhook-timestamp": str(int(now.timestamp())),
                           "webhook-signature": webhook.sign(msg_id, now, body)}
                async with slots:
                    for attempt in range(5):  # a 503 or 429 is retried with the same webhook-id: appended once
                        answer = await client.post(f"/v1/streams/{run.stream_id}/events", content=body,
                                                   headers=headers)
                        if answer.status_code not in (429, 503):
                            break
                        await asyncio.sleep(float(answer.headers.get("retry-after", "1")) * (attempt + 1))
                if answer.status_code == 201:
                    return len(run.events)
                error = PermanentError if 400 <= answer.status_code < 500 else TransientError
                raise error(f"serve answered {answer.status_code} for {run.stream_id}: {answer.text[:500]}")

            async def append(runs: Sequence[Execution]) -> HttpAppended:
                events = await asyncio.gather(*(one(run) for run in runs))
                return HttpAppended(len(runs), sum(events), len(runs), source_id, url)

            yield append
    finally:
        await stop_process(serve)
        log.close()
        conn = await connect_one(settings.database_dsn(), settings.db_schema)
        try:
            await revoke_source(conn, source_id)
        finally:
            await conn.close()
