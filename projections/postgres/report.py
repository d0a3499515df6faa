"""What a run of the fleet did, read back from the projection tables: outcomes, spend, intact chains."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from runledger.projections.postgres.queries import query
from runledger.schemas.chain import ChainBreak, verify_chain

__all__ = ["RunSummary", "summarize"]


@dataclass(slots=True)
class RunSummary:
    """Rows of each summary (as dicts), and the result of re-checking every chain from the audit log."""

    by_status: list[dict[str, Any]] = field(default_factory=list)
    by_model: list[dict[str, Any]] = field(default_factory=list)
    by_workflow: list[dict[str, Any]] = field(default_factory=list)
    top_executions: list[dict[str, Any]] = field(default_factory=list)
    chains_checked: int = 0
    broken_chains: list[ChainBreak] = field(default_factory=list)
    all_runs: dict[str, Any] = field(default_factory=dict)  # executions and events of every run in the schema

    @property
    def chains_intact(self) -> int:
        return self.chains_checked - len(self.broken_chains)


async def summarize(conn: asyncpg.Connection, run_tag: str, *, top: int = 5) -> RunSummary:
    """Summarise the executions whose stream ids start with ``run_tag:``.

    Chains are checked from the audit log's raw bytes (as received, not the
    jsonb copy): every hash recomputed, every link and seq followed.
    """
    summary = RunSummary(
        by_status=[dict(r) for r in await conn.fetch(query("run_by_status"), run_tag)],
        by_model=[dict(r) for r in await conn.fetch(query("run_by_model"), run_tag)],
        by_workflow=[dict(r) for r in await conn.fetch(query("run_by_workflow"), run_tag)],
        top_executions=[dict(r) for r in await conn.fetch(query("run_top_executions"), run_tag, top)],
        all_runs=dict(await conn.fetchrow(query("all_runs"))),
    )
    events = [orjson.loads(r["raw"]) for r in await conn.fetch(query("run_audit_events"), run_tag)]
    summary.chains_checked = len({e["subject"] for e in events})
    summary.broken_chains = verify_chain(events)
    return summary
