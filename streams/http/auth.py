"""Request authentication (Standard Webhooks signatures) and the sources credentials belong to.

Every request names its source in the ``runledger-source`` header and is signed per Standard Webhooks over its raw
body: ``webhook-id`` (the request's idempotency key), ``webhook-timestamp`` (Unix seconds, within
RUNLEDGER_HTTP_TIMESTAMP_TOLERANCE_S, at most 5 minutes, of the server's clock) and ``webhook-signature``: one or
more space-separated ``v1,<base64 HMAC-SHA256>`` (verified with the ``standardwebhooks`` package, which knows only
v1) or ``v1a,<base64 Ed25519>`` signatures (verified here with ``cryptography``: standardwebhooks 1.3.0 for Python
has no v1a) of ``{webhook-id}.{webhook-timestamp}.{body}``. One matching signature of one of the source's usable
credentials is enough: during a rotation's overlap a producer may send the old and the new one.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import Security
from fastapi.security import APIKeyHeader
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.requests import Request

from runledger.streams.http.caller import Caller
from runledger.streams.http.problems import Problem
from runledger.streams.http.services import Services
from runledger.streams.http.sourcecache import SourceCache
from runledger.streams.http.sources import Verifier

__all__ = ["SIGNED", "SOURCE_HEADER", "authenticate", "caller", "verify_signature"]

SOURCE_HEADER = "runledger-source"
_ID = re.compile(r"[\x21-\x7e]{1,256}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_CHALLENGE = {"WWW-Authenticate": 'StandardWebhooks realm="runledger"'}

_SIGNATURE = APIKeyHeader(
    name="webhook-signature", scheme_name="StandardWebhooks", auto_error=False,
    description="Standard Webhooks (https://www.standardwebhooks.com): send `runledger-source: <source id>`, "
    "`webhook-id: <unique id; the request's idempotency key>`, `webhook-timestamp: <Unix seconds>` and "
    "`webhook-signature: v1,<base64 HMAC-SHA256 of \"{webhook-id}.{webhook-timestamp}.{body}\" under the "
    "base64-decoded part of the whsec_ secret>` (or `v1a,<base64 Ed25519 signature>` for a whpk_ key); several "
    "space-separated signatures are allowed. docs/http.md, Authentication.")


def _refuse(code: str, detail: str) -> Problem:
    return Problem(401, code, detail, title="not authenticated", headers=_CHALLENGE)


def check_headers(headers: Mapping[str, str], *, now: float, tolerance_s: int) -> tuple[str, str, str, str]:
    """(source id, webhook-id, webhook-timestamp, webhook-signature) of ``headers``, or a 401 Problem if one is
    missing or malformed, or the timestamp is more than ``tolerance_s`` seconds from ``now``."""
    values = {name: headers.get(name, "") for name in (SOURCE_HEADER, "webhook-id", "webhook-timestamp",
                                                        "webhook-signature")}
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise _refuse("signature_missing", f"the request lacks the header(s) {', '.join(missing)}: sign it per "
                      "Standard Webhooks (docs/http.md, Authentication)")
    source_id, msg_id, stamp, signature = values.values()
    if not _ID.fullmatch(msg_id):
        raise _refuse("signature_missing", "webhook-id must be 1 to 256 printable ASCII characters")
    if not _TIMESTAMP.fullmatch(stamp):
        raise _refuse("timestamp_out_of_range", "webhook-timestamp must be the Unix time in whole seconds")
    if abs(int(stamp) - now) > tolerance_s:
        raise _refuse("timestamp_out_of_range", f"webhook-timestamp {stamp} is more than {tolerance_s} s from the "
                      f"server's clock ({int(now)}): sign each request when it is sent, with a synchronised clock")
    return source_id, msg_id, stamp, signature


def _v1a_matches(public_key: str, signed: bytes, signatures: Iterable[str]) -> bool:
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key.removeprefix("whpk_")))
    for item in signatures:
        version, _, value = item.partition(",")
        if version != "v1a":
            continue
        try:
            key.verify(base64.b64decode(value, validate=True), signed)
        except (InvalidSignature, binascii.Error, ValueError):
            continue
        return True
    return False


def verify_signature(body: bytes, headers: Mapping[str, str], verifiers: Iterable[Verifier]) -> Verifier:
    """The credential one of the request's signatures matches, or a 401 Problem. ``headers``: lower-case names;
    the timestamp is checked already (``check_headers``). v1 through ``standardwebhooks``, v1a with
    ``cryptography`` (the package has no v1a)."""
    msg_id, stamp, signature = headers["webhook-id"], headers["webhook-timestamp"], headers["webhook-signature"]
    signatures = signature.split()
    signed = f"{msg_id}.{stamp}.".encode() + body
    wanted = {"webhook-id": msg_id, "webhook-timestamp": stamp, "webhook-signature": signature}
    for verifier in verifiers:
        if verifier.scheme == "v1":
            try:
                Webhook(verifier.kept).verify(body, wanted, json_parse=False)
            except WebhookVerificationError:
                continue
            return verifier
        if _v1a_matches(verifier.kept, signed, signatures):
            return verifier
    raise _refuse("signature_invalid", "no signature of webhook-signature matches a credential of this source "
                  "over {webhook-id}.{webhook-timestamp}.{body}")


SIGNED: dict[str, Any] = {"security": [{_SIGNATURE.scheme_name: []}]}
"""The OpenAPI of a route that calls ``authenticate`` itself rather than depending on ``caller``."""


async def caller(request: Request, _signature: Annotated[str | None, Security(_SIGNATURE)]) -> Caller:
    """The FastAPI dependency: ``authenticate``, with the signature scheme in the route's OpenAPI."""
    return await authenticate(request)


async def authenticate(request: Request) -> Caller:
    """The verified caller of ``request``, or a 401 ``Problem``.

    Reads the source's usable credentials (held by the source cache, else from PostgreSQL: a StoreUnavailable, 503,
    when it cannot) and the raw body (within RUNLEDGER_HTTP_MAX_BODY_BYTES). Sets ``request.state.webhook_id`` (the
    request's idempotency key: ingest derives each event's from the source id, it and the event's index) and
    ``request.state.caller``."""
    svc: Services = request.app.state.services
    headers = {name: request.headers.get(name, "") for name in (SOURCE_HEADER, "webhook-id", "webhook-timestamp",
                                                                "webhook-signature")}
    source_id, msg_id, _, _ = check_headers(headers, now=time.time(),
                                            tolerance_s=svc.settings.http_timestamp_tolerance_s)
    sources: SourceCache = request.app.state.sources
    record = await sources.get(source_id)
    if record is None:
        raise _refuse("source_unknown", f"no source {source_id!r} may sign requests (unknown, revoked, or every "
                      "credential expired)")
    verify_signature(await request.body(), headers, record.verifiers)
    request.state.webhook_id = msg_id
    request.state.caller = record.caller
    return record.caller
