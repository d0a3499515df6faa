"""One delivery attempt against real HTTP receivers on free ports (``http.server`` in a thread): signed so the
``standardwebhooks`` package verifies it, no redirect followed, a slow receiver cut at the timeout, the response
read to its cap, private addresses refused unless allowed; and ``runledger webhooks ping`` end to end."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from runledger.streams.http.keys import new_credential
from runledger.streams.webhooks.sender import RESPONSE_CAP, post, signature_header
from runledger.streams.webhooks.targets import TargetRefused, parse_target
from tests.conftest import CLI
from tests.integration.httpapi.serving import migrated
from tests.integration.receivers import receiving

pytestmark = pytest.mark.timeout(120)

NODE_DIR = Path(__file__).resolve().parents[1] / "node"


def signed(secrets: list[str], body: bytes) -> dict[str, str]:
    stamp = int(time.time())
    return {"webhook-id": "msg_1", "webhook-timestamp": str(stamp),
            "webhook-signature": signature_header(secrets, "msg_1", stamp, body)}


async def test_a_delivery_verifies_with_each_secret_in_use_and_arrives_as_sent() -> None:
    old, new = new_credential("v1").shown, new_credential("v1").shown
    body = b'{"specversion":"1.0","type":"execution.failed"}'
    with receiving() as receiver:
        target = parse_target(f"http://127.0.0.1:{receiver.port}/hook?x=1", allow_private=True)
        attempt = await post(target, body, signed([new, old], body), allow_private=True)
    assert attempt.ok and attempt.status == 204 and attempt.address == "127.0.0.1"
    [(headers, got)] = receiver.got
    assert got == body and headers["content-type"] == "application/cloudevents+json; charset=UTF-8"
    for secret in (old, new):  # a receiver that has either secret (a rotation's overlap) verifies it
        Webhook(secret).verify(got, headers)


async def test_no_redirect_is_followed_and_a_slow_receiver_is_cut_at_the_timeout() -> None:
    body = b"{}"
    with receiving() as receiver:
        target = parse_target(f"http://127.0.0.1:{receiver.port}/hook", allow_private=True)
        receiver.status, receiver.headers = 302, {"Location": f"http://127.0.0.1:{receiver.port}/elsewhere"}
        moved = await post(target, body, {}, allow_private=True)
        assert (moved.status, moved.ok, moved.retryable, len(receiver.got)) == (302, False, False, 1)

        receiver.status, receiver.headers, receiver.body = 503, {"Retry-After": "7"}, b"x" * 100_000
        busy = await post(target, body, {}, allow_private=True)
        assert (busy.status, busy.retryable, busy.retry_after_s) == (503, True, 7.0)
        assert busy.response == b"x" * RESPONSE_CAP

        receiver.status, receiver.body, receiver.delay_s = 200, b"", 3.0
        slow = await post(target, body, {}, allow_private=True, timeout_s=1.0)
    assert slow.status is None and slow.retryable and "within 1 s" in str(slow.error)
    assert slow.seconds < 2.5


async def test_a_name_that_resolves_to_a_private_address_is_refused_and_the_address_checked_is_the_one_used(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TargetRefused, match="loopback"):
        parse_target("https://127.0.0.1/hook", allow_private=False)
    with receiving() as receiver:
        loop = asyncio.get_running_loop()
        asked: list[str] = []

        async def resolver(host: str, port: int, **_: Any) -> list[Any]:  # a DNS answer: the name is loopback
            asked.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

        monkeypatch.setattr(loop, "getaddrinfo", resolver)
        named = parse_target(f"http://hooks.example.com:{receiver.port}/in", allow_private=True)
        with pytest.raises(TargetRefused, match="loopback"):
            await post(named, b"{}", {}, allow_private=False)
        assert receiver.got == []  # refused before any connection
        allowed = await post(named, b"{}", {}, allow_private=True)
        assert allowed.ok and allowed.address == "127.0.0.1" and asked == ["hooks.example.com"] * 2
        [(headers, _)] = receiver.got
        assert headers["host"] == f"hooks.example.com:{receiver.port}"  # the name, to the address checked


async def test_ping_sends_a_signed_ping_the_receiver_verifies(env: dict[str, str]) -> None:
    env = {**await migrated(env), "RUNLEDGER_WEBHOOK_ALLOW_PRIVATE": "true"}

    def hooks(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "webhooks", *args], env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=60, check=False)

    with receiving() as receiver:
        added = hooks("add", f"http://127.0.0.1:{receiver.port}/in", "--json")
        assert added.returncode == 0, added.stderr
        endpoint, secret = orjson.loads(added.stdout)["endpoint_id"], orjson.loads(added.stdout)["secret"]
        pinged = hooks("ping", endpoint, "--json")
        assert pinged.returncode == 0, pinged.stderr
        assert orjson.loads(pinged.stdout)["status"] == 204
        [(headers, body)] = receiver.got
        Webhook(secret).verify(body, headers)
        event = orjson.loads(body)
        assert (event["type"], event["data"]) == ("runledger.webhook.ping", {"endpoint_id": endpoint})
        receiver.status = 500
        failed = hooks("ping", endpoint)
        assert failed.returncode == 1 and "500" in failed.stdout


async def test_the_node_receiver_of_the_docs_verifies_a_ping_with_the_npm_package(env: dict[str, str]) -> None:
    """docs/webhooks.md's TypeScript receiver (tests/node/webhook_receiver.mjs), run by Node.js with the npm
    standardwebhooks package: a ping verifies; one signed with another secret does not."""
    env = {**await migrated(env), "RUNLEDGER_WEBHOOK_ALLOW_PRIVATE": "true"}
    added = subprocess.run([*CLI, "webhooks", "add", "http://127.0.0.1:9/placeholder", "--json"],
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=True)
    secret = orjson.loads(added.stdout)["secret"]
    node = subprocess.Popen(["node", str(NODE_DIR / "webhook_receiver.mjs")], cwd=NODE_DIR, stdout=subprocess.PIPE,
                            env={**os.environ, "RUNLEDGER_WEBHOOK_SECRET": secret}, text=True)
    try:
        assert node.stdout is not None
        port = orjson.loads(await asyncio.to_thread(node.stdout.readline))["port"]
        target = parse_target(f"http://127.0.0.1:{port}/in", allow_private=True)
        body = b'{"specversion":"1.0","type":"runledger.webhook.ping","data":{}}'
        good = await post(target, body, signed([secret], body), allow_private=True)
        bad = await post(target, body, signed([new_credential("v1").shown], body), allow_private=True)
        assert (good.status, bad.status) == (204, 401)
        lines = [orjson.loads(await asyncio.to_thread(node.stdout.readline)) for _ in range(2)]
        assert lines[0] == {"verified": True, "id": "msg_1", "type": "runledger.webhook.ping"}
        assert lines[1]["verified"] is False
    finally:
        node.terminate()
        node.wait(10)
        if node.stdout is not None:
            node.stdout.close()


async def test_a_retry_after_in_other_digits_than_ascii_is_no_delay_and_no_failure() -> None:
    with receiving() as receiver:
        receiver.status, receiver.headers = 503, {"Retry-After": "\u00b2"}  # latin-1 "²": isdigit(), not a float
        target = parse_target(f"http://127.0.0.1:{receiver.port}/hook", allow_private=True)
        attempt = await post(target, b"{}", {}, allow_private=True)
    assert (attempt.status, attempt.retryable, attempt.retry_after_s) == (503, True, None)
