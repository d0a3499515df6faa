"""The pure parts of serve's authentication: sealed secrets, header and signature checks, durations, the body
limit (in-process, no services)."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from standardwebhooks.webhooks import Webhook
from starlette.requests import Request

from runledger.streams.cli.sources import parse_duration
from runledger.streams.http.app import BodyLimit, BodyTooLarge, _http_error, _problem
from runledger.streams.http.auth import check_headers, verify_signature
from runledger.streams.http.keys import SourcesKey, SourcesKeyInvalid, new_credential, public_key_credential
from runledger.streams.http.problems import Problem
from runledger.streams.http.sources import Verifier


def test_a_sealed_secret_opens_only_with_its_key_and_for_its_row() -> None:
    key = SourcesKey(b"k" * 32)
    sealed = key.seal("fleet", 1, "whsec_abc")
    assert b"whsec_abc" not in sealed
    assert key.unseal("fleet", 1, sealed) == "whsec_abc"
    for source_id, number, other in (("fleet", 2, key), ("other", 1, key), ("fleet", 1, SourcesKey(b"j" * 32))):
        with pytest.raises(SourcesKeyInvalid):
            other.unseal(source_id, number, sealed)


def test_new_credentials() -> None:
    v1 = new_credential("v1")
    assert v1.shown == v1.kept and v1.kept.startswith("whsec_") and len(base64.b64decode(v1.kept[6:])) == 32
    v1a = new_credential("v1a")
    assert v1a.shown.startswith("whsk_") and v1a.kept.startswith("whpk_") and v1a.shown != v1a.kept
    assert public_key_credential(v1a.kept).kept == v1a.kept
    with pytest.raises(ValueError, match="whpk_"):
        public_key_credential("whpk_" + base64.b64encode(b"short").decode())


def headers_of(secret: str, body: bytes, at: float | None = None, msg_id: str = "msg_1") -> dict[str, str]:
    stamp = datetime.fromtimestamp(at if at is not None else time.time(), UTC)
    return {"runledger-source": "fleet", "webhook-id": msg_id, "webhook-timestamp": str(int(stamp.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, stamp, body)}


def test_check_headers_wants_every_header_and_a_timestamp_within_the_tolerance() -> None:
    now = time.time()
    good = headers_of(new_credential("v1").kept, b"", now)
    assert check_headers(good, now=now, tolerance_s=300)[:2] == ("fleet", "msg_1")
    for name in good:
        with pytest.raises(Problem) as missing:
            check_headers({k: v for k, v in good.items() if k != name}, now=now, tolerance_s=300)
        assert missing.value.status == 401 and missing.value.code == "signature_missing"
    for skew in (301, -301):
        with pytest.raises(Problem) as stale:
            check_headers(good, now=now + skew, tolerance_s=300)
        assert stale.value.code == "timestamp_out_of_range"
    check_headers(good, now=now + 299, tolerance_s=300)
    with pytest.raises(Problem):
        check_headers({**good, "webhook-timestamp": "1.5e9"}, now=now, tolerance_s=300)


def test_any_usable_credential_may_match_any_signature() -> None:
    old, new, body = new_credential("v1").kept, new_credential("v1").kept, b'{"type": "x"}'
    verifiers = [Verifier(2, "v1", new), Verifier(1, "v1", old)]
    assert verify_signature(body, headers_of(old, body), verifiers).secret_no == 1
    assert verify_signature(body, headers_of(new, body), verifiers).secret_no == 2
    both = headers_of(old, body)
    both["webhook-signature"] = f"{Webhook(new).sign('msg_1', datetime.fromtimestamp(int(both['webhook-timestamp']), UTC), body)} {both['webhook-signature']}"  # noqa: E501
    assert verify_signature(body, both, [Verifier(1, "v1", old)]).secret_no == 1
    with pytest.raises(Problem) as refused:
        verify_signature(body + b" ", headers_of(old, body), verifiers)
    assert refused.value.code == "signature_invalid"
    with pytest.raises(Problem):
        verify_signature(body, headers_of(old, body), [])


def test_v1a_is_an_ed25519_signature_of_the_same_content() -> None:
    private = Ed25519PrivateKey.generate()
    public = "whpk_" + base64.b64encode(private.public_key().public_bytes_raw()).decode()
    body, stamp = b"[]", str(int(time.time()))
    signature = base64.b64encode(private.sign(f"msg_9.{stamp}.".encode() + body)).decode()
    headers = {"webhook-id": "msg_9", "webhook-timestamp": stamp, "webhook-signature": f"v1,xyz v1a,{signature}"}
    assert verify_signature(body, headers, [Verifier(1, "v1a", public)]).scheme == "v1a"
    with pytest.raises(Problem):
        verify_signature(b"[1]", headers, [Verifier(1, "v1a", public)])
    with pytest.raises(Problem):  # a v1 signature never counts for a v1a key, nor the reverse
        verify_signature(body, {**headers, "webhook-signature": f"v1,{signature}"}, [Verifier(1, "v1a", public)])


def test_durations() -> None:
    assert [parse_duration(t) for t in ("90", "90s", "30m", "24h", "7d", "0", "1.5h")] == [
        90, 90, 1800, 86400, 604800, 0, 5400]
    for bad in ("", "h", "1w", "-1h", "24 hours"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def body_app(limit: int) -> FastAPI:
    app = FastAPI()
    app.add_middleware(BodyLimit, limit=limit)
    app.add_exception_handler(Problem, _problem)
    app.add_exception_handler(BodyTooLarge, _http_error)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, Any]:
        return {"bytes": len(await request.body())}

    return app


async def test_the_body_limit_refuses_from_the_length_or_while_reading() -> None:
    transport = httpx.ASGITransport(body_app(1024))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/echo", content=b"x" * 1024)).json() == {"bytes": 1024}
        declared = await client.post("/echo", content=b"x" * 1025)
        assert declared.status_code == 413 and declared.json()["code"] == "body_too_large"
        assert declared.headers["content-type"] == "application/problem+json"

        sent = 0

        async def chunks() -> Any:
            nonlocal sent
            for _ in range(100):
                sent += 512
                yield b"x" * 512

        streamed = await client.post("/echo", content=chunks())
        assert streamed.status_code == 413 and streamed.json()["code"] == "body_too_large"
        assert sent <= 1024 + 512, f"{sent} bytes read before the refusal: the body was read whole"
        bad = await client.post("/echo", content=b"x", headers={"content-length": "x1"})
        assert bad.status_code == 400
