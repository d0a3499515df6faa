"""``runledger verify``'s database checks: every hash and link of ``audit_log`` recomputed from the stored
bytes (``verify_chains``), the projection tables compared with what the rules give from those events
(``verify_projection``). PostgreSQL against the log itself, and against signed checkpoints, is
``runledger.streams.tools.verifylog``.

Each reads one snapshot (a read-only, repeatable-read transaction), so the tables agree with each other while
workers keep writing, and streams the rows in (stream, seq) order through a pure auditor.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson

from runledger.projections.consistency import TABLES, ProjectionAuditor, RowFinding, StreamRows, empty_rows
from runledger.projections.postgres.attestations import Attestations, fingerprint
from runledger.projections.postgres.db import StoreUnavailable, connect_one
from runledger.projections.postgres.queries import query
from runledger.projections.pricing import ModelPrice, PriceCatalog
from runledger.schemas.chain import Head
from runledger.schemas.errors import PermanentError
from runledger.schemas.verify import ChainAuditor, Finding

__all__ = ["ChainReport", "ProjectionReport", "record_verification", "verify_chains", "verify_projection"]

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


@dataclass(slots=True)
class ProjectionReport(ChainReport):
    """A projection check: ``events`` and ``streams`` are those covered; ``derived_*`` those derived again and
    compared row by row (the rest matched an attestation); ``note`` why no attestation could be used."""

    derived_events: int = 0
    derived_streams: int = 0
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**ChainReport.as_dict(self), "derived_events": self.derived_events,
                "derived_streams": self.derived_streams, "note": self.note}


async def verify_projection(database_url: str, schema: str, *, stream: str | None = None,
                            since: datetime | None = None, attestations: Path | None = None, full: bool = False,
                            progress: Callable[[int, int], None] | None = None) -> ProjectionReport:
    """Compare the projection tables of ``schema`` with the rows the rules give from ``audit_log``'s events
    (one stream, or those touched ``since``; rows of streams with no event at all are found unless ``since``).

    ``attestations``: the file of streams found intact before (``runledger.projections.postgres.attestations``): a
    stream whose events and rows have an attested digest is not derived again; the file is updated with the
    streams found intact now. ``full``: derive every stream, whatever the file says (and rewrite it).
    """
    report = ProjectionReport()
    started, cpu = time.perf_counter(), time.process_time()
    conn = await connect_one(database_url, schema, decode_jsonb=True)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute(query("verify_session"))
            prices = await conn.fetch(query("verify_prices"))
            auditor = ProjectionAuditor(*await _catalogs(conn, prices))
            catalogs = [tuple(r) for r in await conn.fetch(query("verify_catalogs"))] + [tuple(r) for r in prices]
            known = Attestations(_database(database_url, schema), fingerprint(catalogs))
            if attestations is not None:
                known, report.note = Attestations.load(attestations, known.database, known.fingerprint)
            attested = {} if full else known.streams
            total = await conn.fetchval(query("verify_count"), stream, since)
            rows_of = _RowDigests(await conn.cursor(query("verify_row_digests"), stream, since))
            derive: dict[str, str] = {}  # stream -> its digest, for the streams to derive
            current, digest, count = None, hashlib.sha256(), 0

            async def digested(stream_id: str, events: Any, count: int) -> None:
                """A stream's events are all read (``events``, their digest): is the stream's digest attested?"""
                whole = hashlib.sha256(events.digest() + await rows_of.digest(stream_id)).hexdigest()
                report.streams += 1
                report.events += count
                if attested.get(stream_id) != whole:
                    derive[stream_id] = whole
                    report.derived_events += count

            cursor = await conn.cursor(query("verify_raw"), stream, since)
            while rows := await cursor.fetch(_CHUNK):
                for stream_id, raw in rows:
                    if stream_id != current:
                        if current is not None:
                            await digested(current, digest, count)
                        current, digest, count = stream_id, hashlib.sha256(), 0
                    digest.update(len(raw).to_bytes(4, "big") + raw)  # the bytes alone could be cut elsewhere
                    count += 1
                if report.derived_events - auditor.events >= _CHUNK:
                    report.findings += await _derive(conn, auditor, derive, known)
                    derive = {}
                if progress is not None:
                    progress(report.events, total)
            if current is not None:
                await digested(current, digest, count)
            report.findings += await _derive(conn, auditor, derive, known)
            if since is None:
                report.findings += [
                    RowFinding(r["stream_id"], None, r["key"] if r["table"] == "costs" else None, "row_extra",
                               f"{r['table']} row {TABLES[r['table']][1]}={r['key']!r} of stream {r['stream_id']} "
                               "is in the table, but no event of the stream is stored", table=r["table"], key=r["key"])
                    for r in await conn.fetch(query("verify_orphans"), stream)]
    finally:
        await conn.close()
    if attestations is not None:
        known.save(attestations)
    report.derived_streams = auditor.streams
    report.seconds, report.cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    return report


class _RowDigests:
    """The digests of verify_row_digests, one per stream of verify_raw, in the same order."""

    def __init__(self, cursor: asyncpg.cursor.Cursor[asyncpg.Record]) -> None:
        self._cursor, self._rows, self._at = cursor, list[asyncpg.Record](), 0

    async def digest(self, stream_id: str) -> bytes:
        """The digest of the stream's rows (b"" if it has none): the stream after the one asked for before."""
        if self._at == len(self._rows):
            self._rows, self._at = await self._cursor.fetch(_CHUNK), 0
        other, digest = self._rows[self._at] if self._rows else (None, None)
        if other != stream_id:  # the two queries sort differently: a collation changed without a REINDEX?
            raise PermanentError(f"verify_row_digests gives stream {other!r} where verify_raw gives {stream_id!r}: "
                                 "the database sorts stream ids differently in an index and in a sort (a collation "
                                 "that changed without a REINDEX?); `runledger verify projection` cannot pair them")
        self._at += 1
        return bytes(digest or b"")


async def record_verification(database_url: str, schema: str, check: str, report: ChainReport) -> None:
    """Keep what a run found in ``verifications`` (the integrity metrics and dashboard read it). Raises
    StoreUnavailable if it cannot."""
    conn = await connect_one(database_url, schema)
    try:
        codes = Counter(f.code for f in report.findings)
        await conn.execute(query("record_verification"), check, report.seconds, report.events, len(report.findings),
                           orjson.dumps(codes).decode())
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
        raise StoreUnavailable(f"cannot record the verification in {schema}.verifications: {e}") from e
    finally:
        await conn.close()


def _database(database_url: str, schema: str) -> str:
    """Which tables attestations are about: the database's address without credentials, and the schema."""
    url = urlsplit(database_url)
    return f"{url.hostname}:{url.port}{url.path} schema {schema}"


async def _derive(conn: asyncpg.Connection, auditor: ProjectionAuditor, streams: dict[str, str],
                  known: Attestations) -> list[Finding]:
    """Derive and compare ``streams`` (id -> digest); attest those found intact, forget those that are not."""
    if not streams:
        return []
    events: dict[str, list[tuple[int, str, bytes]]] = defaultdict(list)
    for row in await conn.fetch(query("verify_audit_of"), sorted(streams)):
        events[row[0]].append((row[1], row[3], row[2]))
    findings = await _check_streams(conn, auditor, events)
    failed = {f.stream_id for f in findings}
    for stream_id, digest in streams.items():
        if stream_id in failed:
            known.streams.pop(stream_id, None)
        else:
            known.streams[stream_id] = digest
    return findings


async def _catalogs(conn: asyncpg.Connection, rows: list[asyncpg.Record]
                    ) -> tuple[dict[str, PriceCatalog], PriceCatalog]:
    """Every stored catalog version (``rows`` of verify_prices), and the newest one (an empty catalog if none)."""
    prices: dict[str, dict[str, ModelPrice]] = defaultdict(dict)
    for r in rows:
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
