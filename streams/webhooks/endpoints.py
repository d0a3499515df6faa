"""Webhook endpoints in PostgreSQL (migration 020): what ``runledger webhooks`` keeps as the owner.

An endpoint is a URL (checked by ``targets``), an event filter (types, a stream-id prefix, a CloudEvents source)
and its state (enabled, or disabled with a reason), with Standard Webhooks signing secrets (``whsec_``), each shown
once and kept sealed under the sources key. Rotating a secret keeps the ones in use valid through an overlap: the
deliveries meanwhile carry a signature by each.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from runledger.projections.postgres.queries import query
from runledger.schemas.errors import PermanentError
from runledger.schemas.events import EVENT_TYPES
from runledger.streams.http.keys import SourcesKey, new_credential
from runledger.streams.webhooks.targets import parse_target

__all__ = ["EndpointNotFound", "Filter", "add_endpoint", "delivery_secrets", "list_endpoints", "parse_types",
           "remove_endpoint", "rotate_secret", "set_enabled"]

_PREFIX = re.compile(r"[A-Za-z0-9._:-]{0,200}")


class EndpointNotFound(PermanentError):
    """No webhook endpoint has that id (``runledger webhooks list``), or it was removed."""

    code = "endpoint_not_found"


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events an endpoint gets: of one of ``types`` (none: every type), of a stream whose id starts with
    ``stream_prefix``, and of the CloudEvents ``source`` (None: any)."""

    types: tuple[str, ...] = ()
    stream_prefix: str = ""
    source: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.types) - set(EVENT_TYPES))
        if unknown:
            raise ValueError(f"--types: unknown event type(s) {', '.join(map(repr, unknown))}; known: "
                             f"{', '.join(sorted(EVENT_TYPES))}")
        if not _PREFIX.fullmatch(self.stream_prefix):
            raise ValueError("--streams: a stream-id prefix is at most 200 characters from A-Z a-z 0-9 . _ : -")
        if self.source is not None and not 1 <= len(self.source) <= 1000:
            raise ValueError("--source: 1 to 1,000 characters")

    def matches(self, event_type: str, stream_id: str, source: str) -> bool:
        return ((not self.types or event_type in self.types) and stream_id.startswith(self.stream_prefix)
                and (self.source is None or source == self.source))


def _owner(endpoint_id: str) -> str:
    """The sealing's associated data names the endpoint, apart from every source (a source id has no colon)."""
    return f"webhook:{endpoint_id}"


def _new_id() -> str:
    return "wh_" + secrets.token_hex(8)


async def _add_secret(conn: asyncpg.Connection, key: SourcesKey, endpoint_id: str) -> tuple[int, str]:
    """A new secret for ``endpoint_id`` (its row inserted or locked in the caller's transaction): number, secret."""
    secret = new_credential("v1").shown
    number: int = await conn.fetchval(query("webhook_next_secret_no"), endpoint_id)
    await conn.execute(query("webhook_secret_insert"), endpoint_id, number, key.seal(_owner(endpoint_id), number,
                                                                                     secret))
    return number, secret


async def add_endpoint(conn: asyncpg.Connection, key: SourcesKey, url: str, flt: Filter, *,
                       allow_private: bool, endpoint_id: str | None = None,
                       owner_source: str | None = None) -> dict[str, Any]:
    """Add an endpoint (enabled) with its first secret: its id, number and the secret, shown only now.
    ``owner_source``: the source that adds it over the HTTP API (it is delivered only what that source may read).
    Raises TargetRefused (the URL) or ValueError (the id)."""
    parse_target(url, allow_private=allow_private)
    endpoint_id = endpoint_id or _new_id()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", endpoint_id):
        raise ValueError("an endpoint id is 1 to 100 characters from A-Z a-z 0-9 . _ -, starting with a letter or "
                         "digit")
    try:
        async with conn.transaction():
            await conn.execute(query("webhook_insert"), endpoint_id, url, list(flt.types), flt.stream_prefix,
                               flt.source, owner_source)
            number, secret = await _add_secret(conn, key, endpoint_id)
    except asyncpg.UniqueViolationError as e:
        raise ValueError(f"an endpoint {endpoint_id!r} exists already") from e
    return {"endpoint_id": endpoint_id, "url": url, "secret_no": number, "secret": secret}


async def rotate_secret(conn: asyncpg.Connection, key: SourcesKey, endpoint_id: str,
                        overlap_s: float) -> dict[str, Any]:
    """A new secret for ``endpoint_id``; the ones in use stay valid ``overlap_s`` seconds more (0: they end now).
    Raises EndpointNotFound."""
    async with conn.transaction():
        if await conn.fetchrow(query("webhook_lock"), endpoint_id) is None:
            raise EndpointNotFound(f"no webhook endpoint {endpoint_id!r}")
        await conn.execute(query("webhook_secrets_expire"), endpoint_id, overlap_s)
        number, secret = await _add_secret(conn, key, endpoint_id)
    return {"endpoint_id": endpoint_id, "secret_no": number, "secret": secret}


async def set_enabled(conn: asyncpg.Connection, endpoint_id: str, enabled: bool, reason: str | None = None) -> None:
    """Enable ``endpoint_id`` (it gets what it missed, in order, each retried on the whole schedule again), or
    disable it with ``reason``. Raises EndpointNotFound."""
    async with conn.transaction():
        if await conn.fetchval(query("webhook_set_enabled"), endpoint_id, enabled, reason) is None:
            raise EndpointNotFound(f"no webhook endpoint {endpoint_id!r}")
        if enabled:
            await conn.execute(query("webhook_retries_afresh"), endpoint_id)


async def remove_endpoint(conn: asyncpg.Connection, endpoint_id: str) -> None:
    """Remove ``endpoint_id``: nothing more is delivered to it; its history stays. Raises EndpointNotFound."""
    if await conn.fetchval(query("webhook_remove"), endpoint_id) is None:
        raise EndpointNotFound(f"no webhook endpoint {endpoint_id!r}")


async def list_endpoints(conn: asyncpg.Connection, endpoint_id: str | None = None) -> list[dict[str, Any]]:
    """The endpoints not removed (or the one ``endpoint_id``), with their secrets' numbers and dates, never a
    secret. Raises EndpointNotFound if ``endpoint_id`` is given and not found."""
    out = []
    for r in await conn.fetch(query("webhook_list"), endpoint_id):
        item = dict(r)
        item["types"] = list(r["types"])
        for name in ("disabled_at", "failing_since", "created_at"):
            value: datetime | None = r[name]
            item[name] = value.isoformat() if value is not None else None
        out.append(item)
    if endpoint_id is not None and not out:
        raise EndpointNotFound(f"no webhook endpoint {endpoint_id!r}")
    return out


async def delivery_secrets(conn: asyncpg.Connection, key: SourcesKey, endpoint_id: str) -> tuple[str, list[str]]:
    """The URL of ``endpoint_id`` and its secrets in use (newest first), opened. Raises EndpointNotFound."""
    rows = await conn.fetch(query("webhook_delivery_secrets"), endpoint_id)
    if not rows:
        raise EndpointNotFound(f"no webhook endpoint {endpoint_id!r} (or it has no secret in use)")
    return rows[0]["url"], [key.unseal(_owner(endpoint_id), r["secret_no"], r["sealed"]) for r in rows]


def parse_types(text: str | None) -> tuple[str, ...]:
    """``--types T,...`` as a tuple (empty: every type)."""
    return tuple(sorted({t.strip() for t in (text or "").split(",") if t.strip()}))
