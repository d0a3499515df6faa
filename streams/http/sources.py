"""The sources in PostgreSQL (migration 016): what ``runledger sources`` writes as the owner, and what ``serve``
reads, once per request, as runledger_api.

A source is a producer's identity: its id (sent in the ``runledger-source`` header), the CloudEvents ``source`` the
server writes into its events, the stream-id prefixes it may append to and read, its rate limit, and its
credentials. A request sees the source's credentials that are neither revoked nor expired, read here or held by
``serve``'s cache (``runledger.streams.http.sourcecache``) until a change is notified or the first one expires.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from runledger.projections.postgres.db import StoreUnavailable, database_error
from runledger.projections.postgres.queries import query
from runledger.schemas.errors import PermanentError
from runledger.streams.http.caller import Caller
from runledger.streams.http.keys import Credential, Scheme, SourcesKey

__all__ = ["SourceExists", "SourceNotFound", "SourceRecord", "Verifier", "add_source", "list_sources",
           "load_source", "revoke_source", "rotate_source"]


class SourceExists(PermanentError):
    """A source of that id or CloudEvents source exists already: choose another, or ``rotate`` its secret."""

    code = "source_exists"


class SourceNotFound(PermanentError):
    """No source has that id (``runledger sources list``), or it is revoked: add a new one."""

    code = "source_not_found"


@dataclass(frozen=True, slots=True)
class Verifier:
    """One usable credential of a source: ``kept`` is a ``whsec_`` secret (scheme v1) or a ``whpk_`` public key
    (v1a)."""

    secret_no: int
    scheme: Scheme
    kept: str


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """A source as a request sees it: its caller and its usable credentials (newest first), and the seconds until
    the first of them expires (None: none does), as PostgreSQL counted when it was read."""

    caller: Caller
    verifiers: tuple[Verifier, ...]
    expires_in_s: float | None = None


async def load_source(conn: asyncpg.Pool | asyncpg.Connection, key: SourcesKey, source_id: str) -> SourceRecord | None:
    """The source ``source_id`` with its usable credentials, or None if it does not exist, is revoked, or has no
    credential left. Raises StoreUnavailable (PostgreSQL) and SourcesKeyInvalid (the wrong sources key)."""
    try:
        rows = await conn.fetch(query("source_credentials"), source_id)
    except Exception as e:
        error = database_error(e, "read the request's source")
        if error is None:
            raise
        raise (error if isinstance(error, StoreUnavailable) else StoreUnavailable(str(error))) from e
    if not rows:
        return None
    first = rows[0]
    caller = Caller(first["source_id"], first["source"], tuple(first["append_prefixes"]),
                    tuple(first["read_prefixes"]), rate_per_s=first["rate_per_s"], burst=first["burst"])
    expiries = [r["expires_in_s"] for r in rows if r["expires_in_s"] is not None]
    return SourceRecord(caller, tuple(Verifier(r["secret_no"], r["scheme"],
                                               key.unseal(r["source_id"], r["secret_no"], r["sealed"]))
                                      for r in rows), min(expiries, default=None))


async def _add_secret(conn: asyncpg.Connection, key: SourcesKey, source_id: str, credential: Credential) -> int:
    number: int = await conn.fetchval(query("source_next_secret_no"), source_id)
    await conn.execute(query("source_secret_insert"), source_id, number, credential.scheme,
                       key.seal(source_id, number, credential.kept))
    return number


async def add_source(conn: asyncpg.Connection, key: SourcesKey, source_id: str, source: str, *,
                     append_prefixes: Sequence[str], read_prefixes: Sequence[str], rate_per_s: float, burst: int,
                     credential: Credential) -> None:
    """Add the source ``source_id`` with its first credential. Raises SourceExists."""
    try:
        async with conn.transaction():
            await conn.execute(query("source_insert"), source_id, source, list(append_prefixes),
                               list(read_prefixes), rate_per_s, burst)
            await _add_secret(conn, key, source_id, credential)
    except asyncpg.UniqueViolationError as e:
        raise SourceExists(f"a source {source_id!r} or one with the CloudEvents source {source!r} exists") from e
    except asyncpg.CheckViolationError as e:
        raise ValueError(f"refused by the sources table: {e}") from e


async def rotate_source(conn: asyncpg.Connection, key: SourcesKey, source_id: str, credential: Credential,
                        overlap_s: float) -> int:
    """Give ``source_id`` the new ``credential``; its credentials in use stay valid ``overlap_s`` seconds more (0:
    they end now). Returns the new credential's number. Raises SourceNotFound."""
    async with conn.transaction():
        row = await conn.fetchrow(query("source_lock"), source_id)
        if row is None or row["revoked_at"] is not None:
            raise SourceNotFound(f"no source {source_id!r}" + (" (revoked)" if row is not None else ""))
        await conn.execute(query("source_secrets_expire"), source_id, overlap_s)
        return await _add_secret(conn, key, source_id, credential)


async def revoke_source(conn: asyncpg.Connection, source_id: str) -> None:
    """Revoke ``source_id`` and all its credentials, now. Raises SourceNotFound."""
    async with conn.transaction():
        if await conn.fetchrow(query("source_lock"), source_id) is None:
            raise SourceNotFound(f"no source {source_id!r}")
        await conn.execute(query("source_revoke"), source_id)


async def list_sources(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Every source, its grants, limits and credentials' dates; never a secret."""
    out = []
    for r in await conn.fetch(query("source_list")):
        item = dict(r)
        item["append_prefixes"], item["read_prefixes"] = list(r["append_prefixes"]), list(r["read_prefixes"])
        for name in ("created_at", "revoked_at"):
            value: datetime | None = r[name]
            item[name] = value.isoformat() if value is not None else None
        out.append(item)
    return out
