"""Webhook endpoints over the HTTP API, against a real ``serve``, PostgreSQL and receivers: a source adds, lists,
rotates, disables, enables, pings and removes its own endpoints, sees no other's, subscribes only within its read
scope, and the delivery worker delivers its endpoints only what it may read, until it is revoked."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from tests.conftest import CLI
from tests.integration.conftest import poll, rechain, running_worker, settings_of, write_log
from tests.integration.httpapi.serving import Served, add_source, migrated, serving, signed
from tests.integration.receivers import receiving

pytestmark = pytest.mark.timeout(180)


class Api:
    """Signed requests to ``served`` as ``source_id``."""

    def __init__(self, served: Served, client: httpx.AsyncClient, source_id: str, secret: str) -> None:
        self.served, self.client, self.source_id, self.secret = served, client, source_id, secret

    async def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        content = orjson.dumps(body) if body is not None else b""
        headers = signed(self.secret, self.source_id, content)
        if body is not None:
            headers["content-type"] = "application/json"
        return await self.client.request(method, self.served.url + path, content=content, headers=headers)


def source(served: Served, client: httpx.AsyncClient, source_id: str, read_prefix: str) -> Api:
    added = add_source(served, source_id, read_prefix=read_prefix)
    return Api(served, client, source_id, str(added["secret"]))


async def test_a_source_manages_its_own_endpoints_within_its_read_scope(env: dict[str, str]) -> None:
    env = await migrated(env)
    async with serving(env, RUNLEDGER_WEBHOOK_ALLOW_PRIVATE="true") as served, \
            httpx.AsyncClient(timeout=30) as client:
        acme = source(served, client, "acme", "acme:")
        other = source(served, client, "other", "")
        with receiving() as receiver:
            added = await acme.call("POST", "/v1/webhooks", {"url": receiver.url, "types": ["execution.failed"],
                                                              "streams": "acme:billing", "id": "acme-billing"})
            assert added.status_code == 201, added.text
            secret = added.json()["secret"]
            assert added.json()["endpoint_id"] == "acme-billing" and secret.startswith("whsec_")

            for body, status, code in (
                    ({"url": receiver.url, "streams": ""}, 403, "outside_read_scope"),
                    ({"url": receiver.url, "streams": "other:"}, 403, "outside_read_scope"),
                    ({"url": receiver.url, "streams": "acme:", "types": ["nope"]}, 422, "invalid_filter"),
                    ({"url": "ftp://example.com/in", "streams": "acme:"}, 422, "url_refused"),
                    ({"url": receiver.url, "streams": "acme:", "id": "acme-billing"}, 409, "webhook_exists")):
                refused = await acme.call("POST", "/v1/webhooks", body)
                assert (refused.status_code, refused.json()["code"]) == (status, code), refused.text

            listed = (await acme.call("GET", "/v1/webhooks")).json()["endpoints"]
            assert [(e["endpoint_id"], e["types"], e["stream_prefix"]) for e in listed] == [
                ("acme-billing", ["execution.failed"], "acme:billing")]
            assert "whsec_" not in orjson.dumps(listed).decode()
            assert (await other.call("GET", "/v1/webhooks")).json()["endpoints"] == []
            for method, path in (("GET", ""), ("POST", "/disable"), ("POST", "/ping"), ("DELETE", "")):
                foreign = await other.call(method, f"/v1/webhooks/acme-billing{path}",
                                           {"reason": "x"} if path == "/disable" else None)
                assert (foreign.status_code, foreign.json()["code"]) == (404, "webhook_not_found"), foreign.text

            pinged = await acme.call("POST", "/v1/webhooks/acme-billing/ping")
            assert pinged.status_code == 200 and pinged.json()["ok"] and pinged.json()["status"] == 204
            [(headers, body)] = receiver.got
            Webhook(secret).verify(body, headers)

            rotated = await acme.call("POST", "/v1/webhooks/acme-billing/rotate-secret", {"overlap_s": 0})
            assert rotated.status_code == 200 and rotated.json()["secret_no"] == 2
            await acme.call("POST", "/v1/webhooks/acme-billing/ping")
            Webhook(rotated.json()["secret"]).verify(receiver.got[1][1], receiver.got[1][0])

            disabled = await acme.call("POST", "/v1/webhooks/acme-billing/disable", {"reason": "migrating"})
            assert (disabled.json()["enabled"], disabled.json()["disabled_reason"]) == (False, "migrating")
            assert (await acme.call("POST", "/v1/webhooks/acme-billing/enable")).json()["enabled"] is True
            assert (await acme.call("DELETE", "/v1/webhooks/acme-billing")).status_code == 204
            gone = await acme.call("GET", "/v1/webhooks/acme-billing")
            assert (gone.status_code, gone.json()["code"]) == (404, "webhook_not_found")


async def test_an_endpoint_a_source_added_gets_only_what_it_may_read_and_nothing_once_it_is_revoked(
        env: dict[str, str]) -> None:
    env = {**await migrated(env), "RUNLEDGER_WEBHOOK_ALLOW_PRIVATE": "true"}
    async with serving(env) as served, httpx.AsyncClient(timeout=30) as client:
        acme = source(served, client, "acme", "acme:")
        with receiving() as theirs, receiving() as ours:
            added = await acme.call("POST", "/v1/webhooks", {"url": theirs.url, "streams": "acme:"})
            assert added.status_code == 201, added.text
            done = subprocess.run([*CLI, "webhooks", "add", ours.url, "--json"], env={**os.environ, **env},
                                  capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr  # the owner's: every stream, a witness of what was read
            await write_log(settings_of(env), rechain("acme:1") + rechain("zeta:1"))
            async with running_worker(env, command=("webhooks", "worker")):
                async def both() -> bool:
                    return len(theirs.got) >= 9 and len(ours.got) >= 18

                await poll(both, 60, "the deliveries")
                assert {orjson.loads(b)["subject"] for _, b in theirs.got} == {"acme:1"}
                revoked = served.run("sources", "revoke", "acme")
                assert revoked.returncode == 0, revoked.stderr
                await write_log(settings_of(env), rechain("acme:2"))

                async def witnessed() -> bool:
                    return len(ours.got) >= 27

                await poll(witnessed, 60, "acme:2 read and delivered to the owner's endpoint")
            assert len(theirs.got) == 9  # revoked: nothing more for its endpoint


async def test_a_narrowed_read_scope_holds_back_what_was_owed_under_the_wider_one(env: dict[str, str]) -> None:
    env = {**await migrated(env), "RUNLEDGER_WEBHOOK_ALLOW_PRIVATE": "true"}
    settings = settings_of(env)
    async with serving(env) as served, httpx.AsyncClient(timeout=30) as client:
        acme = source(served, client, "acme", "acme:")
        with receiving() as theirs:
            added = await acme.call("POST", "/v1/webhooks", {"url": theirs.url, "streams": "acme:"})
            endpoint = added.json()["endpoint_id"]
            await acme.call("POST", f"/v1/webhooks/{endpoint}/disable", {"reason": "later"})
            await write_log(settings, rechain("acme:wide-1"))  # owed while acme reads all of acme:
            async with running_worker(env, command=("webhooks", "worker")):
                async def owed() -> bool:
                    conn = await asyncpg.connect(settings.database_url,
                                                 server_settings={"search_path": settings.db_schema})
                    try:
                        return await conn.fetchval("SELECT count(*) FROM webhook_messages") == 9
                    finally:
                        await conn.close()

                await poll(owed, 60, "the messages owed")
                conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": settings.db_schema})
                try:  # the owner narrows acme's reads
                    await conn.execute("UPDATE sources SET read_prefixes = '{acme:narrow-}' WHERE source_id = 'acme'")
                finally:
                    await conn.close()
                assert (await acme.call("POST", f"/v1/webhooks/{endpoint}/enable")).status_code == 200
                await write_log(settings, rechain("acme:narrow-1"))

                async def narrow_delivered() -> bool:
                    return len(theirs.got) >= 9

                await poll(narrow_delivered, 60, "the stream still in scope delivered")
            assert {orjson.loads(b)["subject"] for _, b in theirs.got} == {"acme:narrow-1"}
