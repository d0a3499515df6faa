"""Checksums of the projection tables, to prove two sets of tables hold the same rows.

A table's checksum is the MD5 of its rows' MD5s in key order, computed as the rows stream past (a cursor), so
it has no size limit and needs no memory; with ``streams`` it covers those streams' rows only, which is how a
rebuild compares just what changed since its last comparison.
"""

from __future__ import annotations

import hashlib

import asyncpg

from runledger.projections.postgres.queries import quote_schema

__all__ = ["TABLE_KEYS", "table_checksums"]

# Table -> (ordering key, columns left out: when, in which order and after how many deliveries a row was
# written, and where a copy was read from).
TABLE_KEYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "executions": ("stream_id", ("updated_at",)),
    "steps": ("stream_id, step_id", ()),
    "costs": ("event_id", ()),
    "artifacts": ("stream_id, artifact_id", ()),
    "audit_log": ("event_id", ("recorded_at", "kafka_topic", "kafka_partition", "kafka_offset", "attempts",
                               "applied_order", "tree", "leaf_index")),
    "stream_heads": ("stream_id", ("updated_at",)),
}

_CHUNK = 10_000


async def table_checksums(conn: asyncpg.Connection, schema: str,
                          streams: list[str] | None = None) -> dict[str, tuple[int, str]]:
    """(row count, md5 of all rows in key order) per projection table of ``schema`` (of ``streams`` only, if
    given), read in one transaction: the caller's, or one of its own."""
    out = {}
    async with conn.transaction(isolation=None if conn.is_in_transaction() else "repeatable_read"):
        for table, (key, skipped) in TABLE_KEYS.items():
            columns = [r["column_name"] for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 "
                "ORDER BY ordinal_position", schema, table) if r["column_name"] not in skipped]
            if not columns:
                raise ValueError(f"no table {schema}.{table}")
            row = ", ".join(f'"{c}"' for c in columns)
            where = "WHERE stream_id = ANY($1::text[])" if streams is not None else ""
            # Identifiers come from information_schema and a fixed table list, never from input.
            sql = f"SELECT md5(row({row})::text) FROM {quote_schema(schema)}.{table} {where} ORDER BY {key}"
            digest, count = hashlib.md5(usedforsecurity=False), 0
            cursor = await conn.cursor(sql, *([streams] if streams is not None else []))
            while rows := await cursor.fetch(_CHUNK):
                count += len(rows)
                digest.update("".join(r[0] for r in rows).encode())
            # The digest of no rows is "", as md5(string_agg(...)) over nothing was.
            out[table] = (count, digest.hexdigest() if count else "")
    return out
