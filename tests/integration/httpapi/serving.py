"""A real ``runledger serve`` on a free port, over the session's embedded stack, and signed requests to it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
from standardwebhooks.webhooks import Webhook

from tests.conftest import CLI, free_ports
from tests.integration.conftest import poll, read_log, settings_of, terminate


@dataclass
class Served:
    """A running ``serve``: its base URL, metrics URL and environment (``run`` runs the CLI with it)."""

    url: str
    metrics_url: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=60, check=False)


def signed(secret: str | list[str], source_id: str, body: bytes = b"", *, msg_id: str | None = None,
           at: datetime | None = None) -> dict[str, str]:
    """Standard Webhooks headers for ``body``, signed (with the package's ``Webhook.sign``) with each secret."""
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    at = at or datetime.now(UTC)
    secrets = [secret] if isinstance(secret, str) else secret
    signature = " ".join(Webhook(s).sign(msg_id, at, body) for s in secrets)
    return {"runledger-source": source_id, "webhook-id": msg_id, "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": signature}


def add_source(served: Served, source_id: str, *args: str, append_prefix: str | None = None,
               read_prefix: str = "") -> dict[str, object]:
    """``runledger sources add``: ``source_id`` with the CloudEvents source ``/producers/<id>``, appending to
    ``append_prefix`` (default ``<id>:``) and reading ``read_prefix`` (default: everything); its ``--json`` answer
    (the secret is in ``secret``)."""
    done = served.run("sources", "add", source_id, "--source", f"/producers/{source_id}", "--append-prefix",
                      f"{source_id}:" if append_prefix is None else append_prefix, "--read-prefix", read_prefix,
                      *args, "--json")
    assert done.returncode == 0, done.stderr
    out: dict[str, object] = json.loads(done.stdout)
    return out


async def post_signed(client: httpx.AsyncClient, served: Served, path: str, secret: str, source_id: str,
                      body: bytes, headers: Mapping[str, str] | None = None, *, msg_id: str | None = None,
                      at: datetime | None = None) -> httpx.Response:
    """POST ``body`` to ``path`` of ``served``, signed with ``secret`` as ``source_id`` (Content-Type
    application/json unless ``headers`` say otherwise)."""
    sent = {"content-type": "application/json", **(headers or {}),
            **signed(secret, source_id, body, msg_id=msg_id, at=at)}
    return await client.post(served.url + path, content=body, headers=sent)


async def logged(served: Served, stream: str | None = None) -> list[dict[str, object]]:
    """Every event in the log of ``served`` (of ``stream`` if given), in log order."""
    events = [orjson.loads(r.value) for r in await read_log(settings_of(served.env))]
    return [e for e in events if stream is None or e.get("subject") == stream]


async def migrated(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with a schema of its own, migrated as the owner, and a sources key of its own (``init-key``)."""
    from runledger.projections.postgres.db import migrate
    from runledger.streams.http.keys import init_key

    key_dir = Path(tempfile.mkdtemp(prefix="rl-sources-"))
    out = {**env, "RUNLEDGER_DB_SCHEMA": f"t_{uuid.uuid4().hex[:12]}",
           "RUNLEDGER_SOURCES_KEY_FILE": str(key_dir / "sources.key")}
    await migrate(settings_of(out).database_url, out["RUNLEDGER_DB_SCHEMA"])
    init_key(settings_of(out))
    return out


@contextlib.asynccontextmanager
async def serving(env: Mapping[str, str], **extra: str) -> AsyncIterator[Served]:
    """``runledger serve`` on a free port with ``env`` (migrated: ``migrated``) and ``extra`` settings; its log is
    shown if the test fails."""
    port, metrics_port = free_ports(2)
    full = {**env, "RUNLEDGER_METRICS_PORT": str(metrics_port), **extra}
    log = tempfile.TemporaryFile()
    process = subprocess.Popen([*CLI, "serve", "--port", str(port), "--loglevel", "info"],
                               env={**os.environ, **full}, stdout=log, stderr=subprocess.STDOUT)
    served = Served(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", full, process)
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            async def up() -> bool:
                if process.poll() is not None:
                    raise AssertionError(f"serve exited with {process.returncode}")
                with contextlib.suppress(httpx.TransportError):
                    return (await client.get(served.url + "/healthz")).status_code == 200
                return False

            await poll(up, 60, "serve to answer /healthz")
        yield served
    except BaseException:
        log.seek(0)
        sys.stderr.write(log.read().decode(errors="replace")[-20000:])
        raise
    finally:
        try:
            await terminate(process, 20)
        finally:
            log.close()
