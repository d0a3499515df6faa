"""Loads ``sql/``: numbered migrations and the named queries of ``sql/queries.sql``."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

__all__ = ["SQL_DIR", "migrations", "query", "quote_schema"]

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@cache
def _queries() -> dict[str, str]:
    text = (SQL_DIR / "queries.sql").read_text()
    parts = re.split(r"^-- name: (\w+)\s*$", text, flags=re.M)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def query(name: str) -> str:
    """The named query ``name`` from ``sql/queries.sql``."""
    return _queries()[name]


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every ``sql/migrations/NNN_name.sql``, in order."""
    out = []
    for path in sorted((SQL_DIR / "migrations").glob("[0-9][0-9][0-9]_*.sql")):
        out.append((int(path.name[:3]), path.stem[4:], path.read_text()))
    return out


def quote_schema(schema: str) -> str:
    """A schema name as a safe identifier: lowercase letters, digits and _ only (never user text as SQL)."""
    if not _SCHEMA.fullmatch(schema):
        raise ValueError(f"schema name {schema!r} must match {_SCHEMA.pattern}")
    return f'"{schema}"'
