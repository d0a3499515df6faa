"""``runledger webhooks`` against the real PostgreSQL: endpoints added, listed, rotated, disabled, enabled and
removed; secrets shown once and kept sealed; refused URLs and filters named."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import orjson
import pytest

from runledger.projections.postgres.db import connect_one
from runledger.streams.http.keys import load_key
from tests.conftest import CLI
from tests.integration.conftest import settings_of
from tests.integration.httpapi.serving import migrated

pytestmark = pytest.mark.timeout(120)


def hooks(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "webhooks", *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60, check=False)


def one(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout)


async def test_an_endpoints_life_with_its_secret_shown_once_and_kept_sealed(env: dict[str, str]) -> None:
    env = await migrated(env)
    added = one(hooks(env, "add", "https://hooks.example.com/in", "--types", "execution.failed,execution.completed",
                      "--streams", "bill-", "--json"))
    endpoint, secret = added["endpoint_id"], added["secret"]
    assert endpoint.startswith("wh_") and secret.startswith("whsec_") and added["secret_no"] == 1

    listed = hooks(env, "list", "--json")
    assert secret not in listed.stdout and "whsec_" not in listed.stdout
    [item] = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert (item["url"], item["types"], item["stream_prefix"], item["source"], item["enabled"]) == (
        "https://hooks.example.com/in", ["execution.completed", "execution.failed"], "bill-", None, True)
    assert [s["secret_no"] for s in item["secrets"]] == [1]

    settings = settings_of(env)
    conn = await connect_one(settings.database_dsn(), settings.db_schema)
    try:
        sealed = await conn.fetchval("SELECT sealed FROM webhook_secrets WHERE endpoint_id = $1", endpoint)
        assert secret.encode() not in sealed
        assert load_key(settings).unseal(f"webhook:{endpoint}", 1, sealed) == secret
        rotated = one(hooks(env, "rotate-secret", endpoint, "--overlap", "0", "--json"))
        assert rotated["secret_no"] == 2 and rotated["secret"] != secret
        assert [s["secret_no"] for s in one(hooks(env, "show", endpoint, "--json"))["secrets"]] == [2]
        one(hooks(env, "disable", endpoint, "--reason", "receiver migrating", "--json"))
        shown = one(hooks(env, "show", endpoint, "--json"))
        assert (shown["enabled"], shown["disabled_reason"]) == (False, "receiver migrating")
        one(hooks(env, "enable", endpoint, "--json"))
        assert one(hooks(env, "show", endpoint, "--json"))["enabled"] is True
        one(hooks(env, "remove", endpoint, "--json"))
        assert hooks(env, "list", "--json").stdout == ""
        gone = hooks(env, "show", endpoint)
        assert gone.returncode == 2 and "no webhook endpoint" in gone.stderr
        assert await conn.fetchval("SELECT removed_at IS NOT NULL FROM webhook_endpoints WHERE endpoint_id = $1",
                                   endpoint)  # its history stays
    finally:
        await conn.close()


async def test_refused_urls_and_filters_are_named_and_nothing_is_added(env: dict[str, str]) -> None:
    env = await migrated(env)
    for args, why in [(["http://hooks.example.com/in"], "scheme must be https"),
                      (["https://127.0.0.1:8443/in"], "loopback"),
                      (["https://169.254.169.254/latest"], "metadata"),
                      (["https://10.1.2.3/"], "private"),
                      (["https://hooks.example.com/", "--types", "execution.failed,nope"], "unknown event type"),
                      (["https://hooks.example.com/", "--streams", "a b"], "--streams")]:
        refused = hooks(env, "add", *args)
        assert refused.returncode == 2 and why in refused.stderr, (args, refused.stderr)
        assert "Traceback" not in refused.stderr
    assert hooks(env, "list", "--json").stdout == ""
    local = one(hooks({**env, "RUNLEDGER_WEBHOOK_ALLOW_PRIVATE": "true"}, "add", "http://127.0.0.1:9/hook", "--id",
                      "local-receiver", "--json"))
    assert local["endpoint_id"] == "local-receiver"


async def test_a_delivery_worker_without_the_sources_key_says_so_and_starts_nothing(env: dict[str, str]) -> None:
    env = {**await migrated(env), "RUNLEDGER_SOURCES_KEY_FILE": "/nonexistent/sources.key"}
    done = hooks(env, "worker")
    assert done.returncode == 2 and "RUNLEDGER_SOURCES_KEY_FILE" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
