"""``runledger verify``'s database checks: every hash and link of ``audit_log`` recomputed from the stored
bytes (``verify_chains``), the projection tables compared with what the rules give from those events
(``verify_projection``), and the stored events against a signed checkpoint (``verify_checkpoint``).

Each reads one snapshot (a read-only, repeatable-read transaction), so the tables agree with each other while
workers keep writing, and streams the rows in (stream, seq) order through a pure auditor.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from runledger.projections.consistency import TABLES, ProjectionAuditor, RowFinding, StreamRows, empty_rows
from runledger.projections.postgres.db import connect_one
from runledger.projections.postgres.queries import query
from runledger.projections.pricing import ModelPrice, PriceCatalog
from runledger.schemas.chain import Head
from runledger.schemas.checkpoint import Checkpoint
from runledger.schemas.verify import ChainAuditor, Finding, TreeAuditor

__all__ = ["ChainReport", "verify_chains", "verify_checkpoint", "verify_projection"]

_CHUNK = 10_000


@dataclass(slots=True)
class ChainReport:
    """What was checked, what was found, and how fast (wall and this process's CPU time)."""

    events: int = 0
    streams: int = 0
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def intact(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict[str, Any]:
        return {"intact": self.intact, "events": self.events, "streams": self.streams,
                "seconds": round(self.seconds, 3), "events_per_s": round(self.events / self.seconds)
                if self.seconds else None, "events_per_cpu_s": round(self.events / self.cpu_seconds)
                if self.cpu_seconds else None, "findings": [f.as_dict() for f in self.findings]}


async def verify_chains(database_url: str, schema: str, *, stream: str | None = None, since: datetime | None = None,
                        progress: Callable[[int, int], None] | None = None) -> ChainReport:
    """Check the streams of ``audit_log`` in ``schema`` (one stream, or those touched ``since``)."""
    report = ChainReport()
    started, cpu = time.perf_counter(), time.process_time()
    conn = await connect_one(database_url, schema)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            total = await conn.fetchval(query("verify_count"), stream, since)
            heads = {r["stream_id"]: Head(r["seq"], r["hash"])
                     for r in await conn.fetch(query("verify_heads"), stream, since)}
            auditor = ChainAuditor(heads)
            cursor = await conn.cursor(query("verify_audit"), stream, since)
            while rows := await cursor.fetch(_CHUNK):
                report.findings += auditor.check(rows)  # records of the StoredEvent columns, read by position
                if progress is not None:
                    progress(auditor.events, total)
            report.findings += auditor.finish()
    finally:
        await conn.close()
    report.events, report.streams = auditor.events, auditor.streams
    report.seconds, report.cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    return report


async def verify_checkpoint(database_url: str, schema: str, checkpoint: Checkpoint,
                            progress: Callable[[int, int], None] | None = None) -> ChainReport:
    """Recompute the transparency log's first ``checkpoint.size`` leaves from the stored events' bytes and
    compare the root with the checkpoint's: is the log the one that was signed?"""
    report = ChainReport()
    started, cpu = time.perf_counter(), time.process_time()
    auditor = TreeAuditor(checkpoint)
    conn = await connect_one(database_url, schema)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            cursor = await conn.cursor(query("verify_leaves"), checkpoint.size)
            while rows := await cursor.fetch(_CHUNK):
                report.findings += auditor.check([tuple(r) for r in rows])
                if progress is not None:
                    progress(auditor.events, checkpoint.size)
            report.findings += auditor.finish()
    finally:
        await conn.close()
    report.events = auditor.events
    report.seconds, report.cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    return report


async def verify_projection(database_url: str, schema: str, *, stream: str | None = None,
                            since: datetime | None = None,
                            progress: Callable[[int, int], None] | None = None) -> ChainReport:
    """Compare the projection tables of ``schema`` with the rows the rules give from ``audit_log``'s events
    (one stream, or those touched ``since``; rows of streams with no event at all are found unless ``since``)."""
    report = ChainReport()
    started, cpu = time.perf_counter(), time.process_time()
    conn = await connect_one(database_url, schema, decode_jsonb=True)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            auditor = ProjectionAuditor(*await _catalogs(conn))
            total = await conn.fetchval(query("verify_count"), stream, since)
            cursor = await conn.cursor(query("verify_audit"), stream, since)
            events: dict[str, list[tuple[int, str, bytes]]] = defaultdict(list)
            while rows := await cursor.fetch(_CHUNK):
                for row in rows:
                    events[row[0]].append((row[1], row[3], row[2]))
                last = rows[-1][0]
                ready = {s: e for s, e in events.items() if s != last}  # the last stream may go on in the next chunk
                report.findings += await _check_streams(conn, auditor, ready)
                events = defaultdict(list, {last: events[last]})
                if progress is not None:
                    progress(auditor.events, total)
            report.findings += await _check_streams(conn, auditor, events)
            if since is None:
                report.findings += [
                    RowFinding(r["stream_id"], None, r["key"] if r["table"] == "costs" else None, "row_extra",
                               f"{r['table']} row {TABLES[r['table']][1]}={r['key']!r} of stream {r['stream_id']} "
                               "is in the table, but no event of the stream is stored", table=r["table"], key=r["key"])
                    for r in await conn.fetch(query("verify_orphans"), stream)]
    finally:
        await conn.close()
    report.events, report.streams = auditor.events, auditor.streams
    report.seconds, report.cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    return report


async def _catalogs(conn: asyncpg.Connection) -> tuple[dict[str, PriceCatalog], PriceCatalog]:
    """Every stored catalog version, and the newest one (an empty catalog if none is stored)."""
    prices: dict[str, dict[str, ModelPrice]] = defaultdict(dict)
    for r in await conn.fetch(query("verify_prices")):
        prices[r["version"]][r["model"]] = ModelPrice(r["model"], r["provider"], r["input_usd_per_token"],
                                                      r["output_usd_per_token"], r["cached_usd_per_token"])
    catalogs = {version: PriceCatalog(version, "database", models) for version, models in prices.items()}
    newest = await conn.fetchval(query("current_catalog"))
    return catalogs, catalogs.get(newest) or PriceCatalog("none", "database", {})


async def _check_streams(conn: asyncpg.Connection, auditor: ProjectionAuditor,
                         events: dict[str, list[tuple[int, str, bytes]]]) -> list[Finding]:
    """The streams' rows, read table by table, checked stream by stream."""
    if not events:
        return []
    streams = sorted(events)
    stored: dict[str, StreamRows] = {s: empty_rows() for s in streams}
    for table, (_, key_column) in TABLES.items():
        for row in await conn.fetch(query(f"verify_{table}"), streams):
            stored[row["stream_id"]][table][row[key_column]] = tuple(row)
    return [finding for s in streams for finding in auditor.check(s, events[s], stored[s])]
