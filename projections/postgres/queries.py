"""Loads the SQL shipped in ``runledger.sql`` (the ``sql/`` folder): numbered migrations, the named queries
of ``queries.sql`` and the roles of ``roles.sql``. Read as package data, so an installed wheel works outside the
repository."""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable

__all__ = ["SQL_DIR", "migrations", "query", "quote_schema", "roles_sql"]

SQL_DIR: Traversable = files("runledger.sql")
_MIGRATION = re.compile(r"[0-9]{3}_\w+\.sql")
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@cache
def _queries() -> dict[str, str]:
    text = (SQL_DIR / "queries.sql").read_text()
    parts = re.split(r"^-- name: (\w+)\s*$", text, flags=re.M)
    # The comment lines just above a "-- name:" line are the next query's heading, not this query's tail.
    return {name: re.sub(r"(\n--[^\n]*)+\s*$", "", body.strip()).strip()
            for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def query(name: str) -> str:
    """The named query ``name`` from ``sql/queries.sql``."""
    return _queries()[name]


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every ``sql/migrations/NNN_name.sql``, in order."""
    out = []
    for path in sorted((SQL_DIR / "migrations").iterdir(), key=lambda p: p.name):
        if _MIGRATION.fullmatch(path.name):
            out.append((int(path.name[:3]), path.name[4:-4], path.read_text()))
    return out


def roles_sql() -> str:
    """``sql/roles.sql``: the LOGIN roles, and what a superuser grants them (``postgres/roles.py``)."""
    return (SQL_DIR / "roles.sql").read_text()


def quote_schema(schema: str) -> str:
    """A schema name as a safe identifier: lowercase letters, digits and _ only (never user text as SQL)."""
    if not _SCHEMA.fullmatch(schema):
        raise ValueError(f"schema name {schema!r} must match {_SCHEMA.pattern}")
    return f'"{schema}"'
