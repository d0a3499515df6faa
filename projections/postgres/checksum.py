"""Checksums of the projection tables, to prove two sets of tables hold the same rows."""

from __future__ import annotations

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
                               "applied_order", "tlog_index")),
    "stream_heads": ("stream_id", ("updated_at",)),
}


async def table_checksums(conn: asyncpg.Connection, schema: str) -> dict[str, tuple[int, str]]:
    """(row count, md5 of all rows in key order) per projection table of ``schema``."""
    out = {}
    for table, (key, skipped) in TABLE_KEYS.items():
        columns = [r["column_name"] for r in await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 "
            "ORDER BY ordinal_position", schema, table) if r["column_name"] not in skipped]
        if not columns:
            raise ValueError(f"no table {schema}.{table}")
        row = ", ".join(f'"{c}"' for c in columns)
        # Identifiers come from information_schema and a fixed table list, never from input.
        sql = (f"SELECT count(*), coalesce(md5(string_agg(md5(row({row})::text), '' ORDER BY {key})), '') "
               f"FROM {quote_schema(schema)}.{table}")
        count, digest = await conn.fetchrow(sql)
        out[table] = (count, digest)
    return out
