"""Standard Webhooks authentication of a real ``runledger serve``: sources added, rotated and revoked with the
command line, requests signed with the standardwebhooks package; health, readiness, metrics and the body limit."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.conftest import CLI
from tests.integration.conftest import poll
from tests.integration.httpapi.serving import Served, add_source, migrated, serving, signed

pytestmark = pytest.mark.timeout(180)


async def whoami(client: httpx.AsyncClient, served: Served, headers: dict[str, str]) -> httpx.Response:
    return await client.get(served.url + "/v1/whoami", headers=headers)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the series ``name`` with ``labels`` in a Prometheus text page (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_signed_requests_pass_and_every_bad_one_is_a_401_problem(env: dict[str, str]) -> None:
    env = await migrated(env)
    async with serving(env) as served, httpx.AsyncClient(timeout=10) as client:
        secret = str(add_source(served, "fleet-a")["secret"])
        assert secret.startswith("whsec_")

        good = await whoami(client, served, signed(secret, "fleet-a"))
        assert good.status_code == 200, good.text
        assert good.json() == {"source_id": "fleet-a", "source": "/producers/fleet-a", "append_prefixes": ["fleet-a:"],
                               "read_prefixes": [""], "rate_per_s": 1000.0, "burst": 2000}

        other = "whsec_" + base64.b64encode(b"k" * 32).decode()
        cases = {
            "signature_invalid": signed(other, "fleet-a"),
            "timestamp_out_of_range": signed(secret, "fleet-a", at=datetime.now(UTC) - timedelta(minutes=6)),
            "source_unknown": signed(secret, "fleet-b"),
            "signature_missing": {k: v for k, v in signed(secret, "fleet-a").items() if k != "webhook-signature"},
        }
        future = signed(secret, "fleet-a", at=datetime.now(UTC) + timedelta(minutes=6))
        for code, headers in [*cases.items(), ("timestamp_out_of_range", future)]:
            refused = await whoami(client, served, headers)
            assert refused.status_code == 401, (code, refused.text)
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["code"] == code and refused.json()["status"] == 401
            assert "WWW-Authenticate" in refused.headers

        # a signature over another body does not pass (the body is signed)
        headers = signed(secret, "fleet-a", b'{"a": 1}')
        tampered = await client.request("GET", served.url + "/v1/whoami", headers=headers, content=b'{"a": 2}')
        assert tampered.status_code == 401 and tampered.json()["code"] == "signature_invalid"

        assert (await client.get(served.url + "/healthz")).json() == {"status": "up"}
        ready = await client.get(served.url + "/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"kafka": "ok", "postgres": "ok", "redis": "ok"}

        page = (await client.get(served.metrics_url)).text
        assert metric(page, "runledger_http_requests_total", route="/v1/whoami", status="200") == 1
        assert metric(page, "runledger_http_requests_total", route="/v1/whoami", status="401") == 6
        assert metric(page, "runledger_http_refusals_total", reason="signature_invalid") == 2
        assert metric(page, "runledger_http_refusals_total", reason="timestamp_out_of_range") == 2
        assert metric(page, "runledger_http_request_seconds_count", route="/readyz") == 1

        schema = await client.get(served.url + "/openapi.json")
        assert "StandardWebhooks" in schema.json()["components"]["securitySchemes"]


async def test_an_ed25519_source_signs_v1a(env: dict[str, str]) -> None:
    env = await migrated(env)
    async with serving(env) as served, httpx.AsyncClient(timeout=10) as client:
        private = Ed25519PrivateKey.generate()
        public = "whpk_" + base64.b64encode(private.public_key().public_bytes_raw()).decode()
        add_source(served, "edge", "--public-key", public)
        headers = signed("whsec_" + base64.b64encode(b"x" * 32).decode(), "edge")  # a v1 signature nobody holds
        content = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode()
        v1a = "v1a," + base64.b64encode(private.sign(content)).decode()
        assert (await whoami(client, served, headers)).status_code == 401
        both = {**headers, "webhook-signature": headers["webhook-signature"] + " " + v1a}
        ok = await whoami(client, served, both)
        assert ok.status_code == 200, ok.text
        assert ok.json()["source_id"] == "edge"

        made = add_source(served, "edge-made", "--asymmetric")  # the server makes the pair, shows the private key
        seed = base64.b64decode(str(made["secret"]).removeprefix("whsk_"))
        mine = Ed25519PrivateKey.from_private_bytes(seed)
        assert made["public_key"] == "whpk_" + base64.b64encode(mine.public_key().public_bytes_raw()).decode()
        headers = {**headers, "runledger-source": "edge-made"}
        headers["webhook-signature"] = "v1a," + base64.b64encode(mine.sign(content)).decode()
        assert (await whoami(client, served, headers)).json()["source_id"] == "edge-made"
        assert "whsk_" not in served.run("sources", "list", "--json").stdout


async def test_a_rotated_secret_works_through_its_overlap_and_a_revoked_one_fails_at_once(
        env: dict[str, str]) -> None:
    env = await migrated(env)
    async with serving(env) as served, httpx.AsyncClient(timeout=10) as client:
        old = str(add_source(served, "fleet-r")["secret"])
        rotated = served.run("sources", "rotate", "fleet-r", "--overlap", "3s", "--json")
        assert rotated.returncode == 0, rotated.stderr
        new = str(json.loads(rotated.stdout)["secret"])
        ends = time.monotonic() + 3
        assert new != old
        assert (await whoami(client, served, signed(old, "fleet-r"))).status_code == 200  # within the overlap
        assert (await whoami(client, served, signed(new, "fleet-r"))).status_code == 200
        assert (await whoami(client, served, signed([new, old], "fleet-r"))).status_code == 200

        async def old_refused() -> bool:
            return (await whoami(client, served, signed(old, "fleet-r"))).status_code == 401

        await poll(old_refused, 20, "the old secret to end with its overlap")
        assert time.monotonic() >= ends - 0.5, "the old secret ended before its overlap"
        assert (await whoami(client, served, signed(new, "fleet-r"))).status_code == 200

        listing = served.run("sources", "list", "--json")
        assert listing.returncode == 0 and old not in listing.stdout and new not in listing.stdout
        assert "whsec_" not in listing.stdout

        revoked = served.run("sources", "revoke", "fleet-r")
        assert revoked.returncode == 0, revoked.stderr
        refused = await whoami(client, served, signed(new, "fleet-r"))  # at once: no wait
        assert refused.status_code == 401 and refused.json()["code"] == "source_unknown"


def raw_request(port: int, head: bytes, body_chunks: list[bytes]) -> bytes:
    """Send ``head`` and ``body_chunks`` on a socket (never ending a chunked body), and read the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            sock.sendall(chunk)
        out = b""
        while b"\r\n\r\n" not in out or not out.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            out += data
        return out


async def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read_whole(env: dict[str, str]) -> None:
    env = await migrated(env)
    async with serving(env, RUNLEDGER_HTTP_MAX_BODY_BYTES="4096") as served:
        secret = str(add_source(served, "fleet-big")["secret"])
        port = int(served.url.rsplit(":", 1)[1])
        headers = signed(secret, "fleet-big", b"")
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        # Content-Length says a gigabyte and no byte of it is sent: refused from the header alone.
        head = f"POST /v1/whoami HTTP/1.1\r\nHost: x\r\n{lines}Content-Length: 1000000000\r\n\r\n".encode()
        answer = await asyncio.to_thread(raw_request, port, head, [])
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"application/problem+json" in answer and b"body_too_large" in answer
        # Chunked, no length: refused once 4 KiB have come, the body never ended.
        head = f"GET /v1/whoami HTTP/1.1\r\nHost: x\r\n{lines}Transfer-Encoding: chunked\r\n\r\n".encode()
        chunk = b"1000\r\n" + b"x" * 4096 + b"\r\n"
        answer = await asyncio.to_thread(raw_request, port, head, [chunk, chunk])
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"body_too_large" in answer


async def test_postgres_unreachable_readyz_names_it_and_requests_get_503_with_retry_after(
        env: dict[str, str]) -> None:
    from tests.conftest import free_ports

    env = await migrated(env)
    [nowhere] = free_ports(1)
    url = env["RUNLEDGER_DATABASE_URL"].replace(env["RUNLEDGER_DATABASE_URL"].rsplit(":", 1)[1].split("/")[0],
                                                str(nowhere))
    async with serving(env, RUNLEDGER_DATABASE_URL=url) as served, httpx.AsyncClient(timeout=20) as client:
        ready = await client.get(served.url + "/readyz")
        assert ready.status_code == 503 and ready.headers["Retry-After"] == "2", ready.text
        assert [e["field"] for e in ready.json()["errors"]] == ["postgres"]
        headers = signed("whsec_" + base64.b64encode(b"s" * 32).decode(), "fleet-x")
        down = await client.get(served.url + "/v1/whoami", headers=headers)
        assert down.status_code == 503 and down.headers["Retry-After"] == "2", down.text
        assert down.json()["code"] == "unavailable"


def test_the_sources_command_on_a_schema_not_migrated_says_what_to_run(env: dict[str, str]) -> None:
    """It printed a traceback (relation "sources" does not exist) on a stack whose schema no worker had migrated."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    listed = subprocess.run([*CLI, "sources", "list"], env={**os.environ, **env, "RUNLEDGER_DB_SCHEMA": schema},
                            capture_output=True, text=True, timeout=60, check=False)
    assert listed.returncode == 2, listed.stderr
    assert "runledger db migrate" in listed.stderr and schema in listed.stderr
    assert "Traceback" not in listed.stderr
