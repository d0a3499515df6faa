"""What the read API (``runledger serve``: streams/http/reads.py) reads from PostgreSQL: executions a page at a time,
one execution whole, a stream's events as stored, the newest checkpoints and an event's inclusion proof.

Every query is a named one of ``sql/queries.sql`` (``read_*``, ``event_leaf``, ``tree_leaves_at``,
``covering_checkpoint``, ``tree_nodes``); the api login is granted SELECT on exactly the columns they read
(docs/http.md "Reading"). A caller's read scope is a list of stream-id prefixes, applied in SQL before a page is
cut, never to the rows of a page.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from runledger.projections.postgres.queries import query
from runledger.projections.postgres.trees import range_roots
from runledger.schemas.checkpoint import Checkpoint
from runledger.schemas.errors import PermanentError
from runledger.schemas.logtrees import origin_of
from runledger.schemas.merkle import inclusion_ranges
from runledger.schemas.proofs import inclusion_document

__all__ = ["EventNotFound", "ExecutionFilter", "Proof", "ProofNotReady", "events", "execution", "executions",
           "inclusion_proof", "latest_checkpoints"]


@dataclass(frozen=True, slots=True)
class ExecutionFilter:
    """What ``executions`` selects: streams under one of ``prefixes`` ("" is every stream) and, where not None, of
    this status, workflow and customer, started in [``started_from``, ``started_to``)."""

    prefixes: Sequence[str]
    status: str | None = None
    workflow: str | None = None
    customer: str | None = None
    started_from: datetime | None = None
    started_to: datetime | None = None


async def executions(conn: asyncpg.Connection | asyncpg.Pool, selected: ExecutionFilter,
                     after: tuple[datetime, str] | None, limit: int) -> tuple[list[asyncpg.Record], bool]:
    """Up to ``limit`` executions newest first (by started_at, then stream id, descending) after the cursor
    ``after`` (the (started_at, stream_id) of the previous page's last row), and whether more follow."""
    rows = await conn.fetch(query("read_executions"), list(selected.prefixes), selected.status, selected.workflow,
                            selected.customer, selected.started_from, selected.started_to,
                            after[0] if after else None, after[1] if after else None, limit + 1)
    return rows[:limit], len(rows) > limit


async def execution(conn: asyncpg.Connection, stream_id: str) -> dict[str, Any] | None:
    """The execution ``stream_id``'s row, with its ``steps``, ``costs`` and ``artifacts``; None if there is none.
    Read in one repeatable-read transaction, so the parts agree with the totals."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(query("read_execution"), stream_id)
        if row is None:
            return None
        return {**dict(row), "steps": await conn.fetch(query("read_steps"), stream_id),
                "costs": await conn.fetch(query("read_costs"), stream_id),
                "artifacts": await conn.fetch(query("read_artifacts"), stream_id)}


async def events(conn: asyncpg.Connection | asyncpg.Pool, stream_id: str, after_seq: int,
                 limit: int) -> tuple[list[tuple[int, bytes]], bool] | None:
    """(seq, the record's bytes as stored) of up to ``limit`` events of ``stream_id`` after ``after_seq``, and
    whether more follow; None if no event of the stream is stored at all."""
    rows = await conn.fetch(query("read_events"), stream_id, after_seq, limit + 1)
    if not rows and not await conn.fetchval(query("read_stream_known"), stream_id):
        return None
    return [(r["seq"], bytes(r["raw"])) for r in rows[:limit]], len(rows) > limit


async def latest_checkpoints(conn: asyncpg.Connection | asyncpg.Pool, base_origin: str,
                             topic: str) -> list[asyncpg.Record]:
    """The newest checkpoint kept of each partition of the log topic ``topic`` that has a tree, by partition."""
    partitions = [r["partition"] for r in await conn.fetch(query("read_tree_partitions"), topic)]
    rows: list[asyncpg.Record] = await conn.fetch(query("read_latest_checkpoints"),
                                                  [origin_of(base_origin, topic, p) for p in partitions])
    return rows


class EventNotFound(PermanentError):
    """No event of this id is in audit_log: it was never appended, or is not projected yet (``runledger wait``)."""

    code = "event_not_found"


class ProofNotReady(PermanentError):
    """The event is projected but no signed checkpoint covers it yet (or its partition's tree does not reach it):
    the next signer round (every RUNLEDGER_CHECKPOINT_INTERVAL_S, or ``runledger checkpoint``) signs one."""

    code = "proof_not_ready"

    def __init__(self, message: str, stream_id: str) -> None:
        super().__init__(message)
        self.stream_id = stream_id


@dataclass(frozen=True, slots=True)
class Proof:
    """An inclusion proof document (``runledger-inclusion-proof/2``, docs/proofs.md) and the stream it proves an
    event of."""

    stream_id: str
    document: dict[str, Any]


async def inclusion_proof(conn: asyncpg.Connection, base_origin: str, event_id: str) -> Proof:
    """The event's inclusion proof in its partition's tree, under the newest checkpoint of that partition that covers
    it (what ``runledger prove`` writes). Raises EventNotFound or ProofNotReady. Unchecked: the caller verifies it
    with the verifier key (PostgreSQL's copy of a tree proves nothing by itself)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        leaf = await conn.fetchrow(query("event_leaf"), event_id)
        if leaf is None:
            raise EventNotFound(f"event {event_id} is not in audit_log")
        position = (leaf["kafka_topic"], leaf["kafka_partition"], leaf["kafka_offset"])
        tree, index = leaf["tree"], leaf["leaf_index"]
        if index is None:  # written before its leaf was (from a retry topic): the leaf at its position
            at = await conn.fetchrow(query("tree_leaves_at"), *([p] for p in position))
            if at is None:
                raise ProofNotReady(f"event {event_id} has no leaf at {position[0]} partition {position[1]} offset "
                                    f"{position[2]}: its partition's tree does not reach it yet (`runledger trees "
                                    "rebuild` builds the trees of a log projected before migration 012)",
                                    leaf["stream_id"])
            tree, index = at["tree"], at["index"]
        origin = origin_of(base_origin, leaf["kafka_topic"], leaf["kafka_partition"])
        note = await conn.fetchval(query("covering_checkpoint"), index, origin)
        if note is None:
            raise ProofNotReady(f"no checkpoint of {origin} covers event {event_id} (leaf {index}) yet: sign one "
                                "with `runledger checkpoint`", leaf["stream_id"])
        size = Checkpoint.parse(note).size
        proof = await range_roots(conn, tree, inclusion_ranges(index, size))
    return Proof(leaf["stream_id"], inclusion_document(note, bytes(leaf["raw"]), leaf["kafka_partition"],
                                                       leaf["kafka_offset"], int(index), proof))
