"""One delivery attempt: a signed ``POST`` to an endpoint, to an address checked when it was resolved.

The host is resolved once per attempt and every address it resolves to is checked (``targets``); the connection
goes to the first one, with TLS verified against the host's name (SNI and certificate), so a DNS answer cannot
change between the check and the connection. No redirect is followed (a 3xx is the attempt's answer), the connect
and the whole attempt each have a timeout, and at most ``RESPONSE_CAP`` bytes of the response's body are read.

Signing follows Standard Webhooks: ``webhook-id`` (stable across the attempts of one delivery),
``webhook-timestamp`` and ``webhook-signature`` with a ``v1,`` signature by each of the endpoint's secrets in use
(a rotation's overlap), so a receiver verifies it with the ``standardwebhooks`` package of its language.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httptools

from runledger.streams.webhooks.targets import IPAddress, Target, check_addresses

__all__ = ["RESPONSE_CAP", "Attempt", "post", "signature_header"]

RESPONSE_CAP = 1024  # bytes of a response's body kept (webhook_deliveries.response) and read at most
CONTENT_TYPE = "application/cloudevents+json; charset=UTF-8"


def signature_header(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """``webhook-signature``: ``v1,<base64 HMAC-SHA256>`` of ``{id}.{timestamp}.{body}`` by each ``whsec_``
    secret, space-separated."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.digest(base64.b64decode(s.removeprefix("whsec_")), signed,
                                                         hashlib.sha256)).decode() for s in secrets)


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one attempt got: the status (None: no answer), how long it took, the first bytes of the response's
    body, ``Retry-After`` in seconds if the receiver sent one, and the error (None if it answered)."""

    status: int | None
    seconds: float
    response: bytes = b""
    retry_after_s: float | None = None
    error: str | None = None
    address: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        """A failure worth retrying: no answer, a timeout, a 5xx, 429 or 408. Any other 3xx or 4xx is permanent."""
        return not self.ok and (self.status is None or self.status >= 500 or self.status in (408, 429))


class _Response:
    """httptools' callbacks: the status, ``Retry-After``, and the body up to the cap."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.done = False
        self.retry_after: bytes | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self.retry_after = value

    def on_body(self, body: bytes) -> None:
        if len(self.body) < RESPONSE_CAP:
            self.body += body[:RESPONSE_CAP - len(self.body)]

    def on_message_complete(self) -> None:
        self.done = True


def _retry_after(value: bytes | None) -> float | None:
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    # Seconds as ASCII digits only (latin-1 has other digits float() refuses); an HTTP date is not honoured: the
    # schedule's delay is used.
    return float(text) if text.isascii() and text.isdigit() else None


async def _resolve(target: Target, allow_private: bool) -> list[IPAddress]:
    if target.literal is not None:
        addresses: list[IPAddress] = [target.literal]
    else:
        infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    return check_addresses(addresses, allow_private=allow_private)


async def post(target: Target, body: bytes, headers: dict[str, str], *, allow_private: bool,
               connect_timeout_s: float = 5.0, timeout_s: float = 15.0) -> Attempt:
    """POST ``body`` with ``headers`` to ``target``; never raises for what the network or the receiver does (the
    Attempt says it), only TargetRefused for an address that may not be reached."""
    started = time.monotonic()
    addresses = await _resolve(target, allow_private)  # TargetRefused: not an attempt
    address = str(addresses[0])
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (f"POST {target.path} HTTP/1.1\r\nHost: {target.host}"
               f"{'' if target.port in (80, 443) else f':{target.port}'}\r\nContent-Type: {CONTENT_TYPE}\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\nUser-Agent: runledger-webhooks\r\n{head}\r\n"
               ).encode() + body
    writer, phase = None, "connect"
    try:
        async with asyncio.timeout(timeout_s):
            tls = ssl.create_default_context() if target.scheme == "https" else None
            async with asyncio.timeout(connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    address, target.port, ssl=tls, server_hostname=target.host if tls else None)
            phase = "answer"
            writer.write(request)
            await writer.drain()
            got = _Response()
            parser = httptools.HttpResponseParser(got)
            while not got.done:
                chunk = await reader.read(65536)
                if not chunk:  # closed: what it answered is what it answered
                    break
                parser.feed_data(chunk)
                if len(got.body) >= RESPONSE_CAP and parser.get_status_code():
                    break  # the rest of a large body is not read
            status = parser.get_status_code() or None
        return Attempt(status, time.monotonic() - started, bytes(got.body), _retry_after(got.retry_after),
                       None if status else "no HTTP answer", address)
    except TimeoutError:
        limit = connect_timeout_s if phase == "connect" else timeout_s
        return Attempt(None, time.monotonic() - started, error=f"no {phase} within {limit:g} s", address=address)
    except (OSError, ssl.SSLError, httptools.HttpParserError) as e:
        return Attempt(None, time.monotonic() - started, error=f"{type(e).__name__}: {e}", address=address)
    finally:
        if writer is not None:
            writer.close()
