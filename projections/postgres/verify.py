"""``runledger verify chains``: every hash and link of ``audit_log`` recomputed from the stored bytes.

Reads one snapshot (a read-only, repeatable-read transaction), so the stream heads and the events agree
with each other while workers keep writing, and streams the rows in (stream, seq) order through the pure
``ChainAuditor``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from runledger.projections.postgres.db import connect_one
from runledger.projections.postgres.queries import query
from runledger.schemas.chain import Head
from runledger.schemas.checkpoint import Checkpoint
from runledger.schemas.verify import ChainAuditor, Finding, TreeAuditor

__all__ = ["ChainReport", "verify_chains", "verify_checkpoint"]

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
