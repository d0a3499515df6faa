"""Webhook delivery workers (``runledger webhooks worker``) against the real Kafka and PostgreSQL of the session's
stack and real HTTP receivers on free ports: what matches is delivered as stored, signed, in seq order per stream;
failures are retried on the schedule through the retry topics and hold back only their own endpoint and stream;
dead deliveries are replayed; a worker killed mid-delivery and a PostgreSQL outage lose nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections import defaultdict
from typing import Any

import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from runledger.projections.postgres.db import connect_one
from tests.conftest import CLI
from tests.integration.conftest import poll, read_log, rechain, running_worker, settings_of, write_log
from tests.integration.httpapi.serving import migrated
from tests.integration.receivers import Receiver, receiving

pytestmark = pytest.mark.timeout(240)

WORKER = ("webhooks", "worker")


def hooks(env: dict[str, str], *args: str) -> Any:
    done = subprocess.run([*CLI, "webhooks", *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout) if "--json" in args else done.stdout


async def delivery_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**await migrated(env), "RUNLEDGER_WEBHOOK_ALLOW_PRIVATE": "true", **extra}


def add(env: dict[str, str], receiver: Receiver, *args: str) -> tuple[str, str]:
    added = hooks(env, "add", receiver.url, *args, "--json")
    return added["endpoint_id"], added["secret"]


async def received(receiver: Receiver, count: int, deadline_s: float = 60.0) -> None:
    async def enough() -> bool:
        return len(receiver.got) >= count

    await poll(enough, deadline_s, f"{count} deliveries (got {len(receiver.got)})")


def by_stream(receiver: Receiver) -> dict[str, list[int]]:
    seqs: defaultdict[str, list[int]] = defaultdict(list)
    for _, body in receiver.got:
        event = orjson.loads(body)
        seqs[event["subject"]].append(event["seq"])
    return dict(seqs)


async def fetch(env: dict[str, str], sql: str, *args: Any) -> list[Any]:
    settings = settings_of(env)
    conn = await connect_one(settings.database_dsn(), settings.db_schema)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def test_every_matching_event_is_delivered_as_stored_verified_and_in_seq_order(env: dict[str, str]) -> None:
    env = await delivery_env(env)
    with receiving() as receiver, receiving() as other:
        endpoint, secret = add(env, receiver, "--streams", "bill-")
        failed_only, other_secret = add(env, other, "--types", "execution.completed")
        streams = [rechain(f"bill-{n}") for n in range(3)]
        await write_log(settings_of(env), [e for events in streams for e in events] + rechain("ops-1"))
        async with running_worker(env, command=WORKER):
            await received(receiver, 27)
            await received(other, 4)
        stored = {orjson.loads(r.value)["id"]: r.value for r in await read_log(settings_of(env))}
        for headers, body in receiver.got:
            Webhook(secret).verify(body, headers)
            assert body == stored[orjson.loads(body)["id"]]  # byte for byte as the log holds it
            assert headers["content-type"].startswith("application/cloudevents+json")
        for headers, body in other.got:
            Webhook(other_secret).verify(body, headers)
        assert by_stream(receiver) == {f"bill-{n}": list(range(1, 10)) for n in range(3)}
        assert sorted(by_stream(other)) == ["bill-0", "bill-1", "bill-2", "ops-1"]
        assert {orjson.loads(b)["type"] for _, b in other.got} == {"execution.completed"}
    rows = await fetch(env, "SELECT m.msg_id, m.state, d.attempt, d.status FROM webhook_messages m "
                            "JOIN webhook_deliveries d USING (msg_id) WHERE m.endpoint_id = $1", endpoint)
    assert len(rows) == 27 and {(r["state"], r["attempt"], r["status"]) for r in rows} == {("delivered", 1, 204)}
    assert {h["webhook-id"] for h, _ in receiver.got} == {r["msg_id"] for r in rows}
    assert failed_only != endpoint
