"""The LOGIN roles each component connects as (``sql/roles.sql``), created or brought up to date by a superuser:
``runledger db roles`` in compose.yaml's roles service, and ``runledger dev up`` for the embedded stack."""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg

from runledger.projections.postgres.db import StoreUnavailable, cannot_connect
from runledger.projections.postgres.queries import quote_schema, roles_sql

__all__ = ["create_roles"]


async def create_roles(admin_url: str, schema: str, passwords: Mapping[str, str]) -> None:
    """Run ``sql/roles.sql`` as the superuser of ``admin_url``: every role of ``passwords`` (role name -> password)
    a login with that password, the reader's search path ``schema``. Idempotent; a changed password is set again.
    The passwords travel as parameters, never in a statement's text. Raises StoreUnavailable."""
    quote_schema(schema)  # a schema name as the migrations accept it
    try:
        conn = await asyncpg.connect(admin_url)
    except (OSError, asyncpg.PostgresError) as e:
        raise cannot_connect(admin_url, e) from e
    try:
        async with conn.transaction():
            for role, password in passwords.items():
                await conn.execute("SELECT set_config($1, $2, true)", f"runledger.password.{role}", password)
            await conn.execute("SELECT set_config('runledger.schema', $1, true)", schema)
            await conn.execute(roles_sql())
    except (OSError, asyncpg.PostgresError) as e:
        message = f"{e}"
        for password in passwords.values():
            message = message.replace(password, "***")
        raise StoreUnavailable(f"cannot create runledger's roles: {message}") from e
    finally:
        await conn.close()
