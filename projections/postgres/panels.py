"""The panels drawn from the projection tables: one definition for Grafana's dashboards and for the static HTML
report, so both show the same thing from the same SQL (the ``panel_*`` queries of ``sql/queries.sql``).

A panel's query gives, by its kind: ``timeseries`` (time, metric, value) rows, one line per metric; ``bar``
(label, value) rows; ``table`` any columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

from runledger.projections.postgres.queries import query

__all__ = ["COST", "EXECUTIONS", "INTEGRITY", "Panel", "panel_rows"]


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    query: str  # the name of a panel_* query
    kind: Literal["timeseries", "bar", "table"]
    unit: str = ""  # Grafana's unit id: "currencyUSD", "s", "percent", "short"
    description: str = ""

    @property
    def sql(self) -> str:
        return query(self.query)


EXECUTIONS = (
    Panel("Executions started by status, per hour", "panel_executions_by_status", "timeseries", "short",
          "The last 7 days, by the status each execution has now"),
    Panel("Median duration by workflow", "panel_duration_by_workflow", "bar", "s",
          "Executions that ended, from execution.started to their end"),
    Panel("Failure rate per day", "panel_failure_rate", "timeseries", "percent",
          "Executions started that day that failed or timed out, in percent (30 days)"),
    Panel("Top failing workflows", "panel_top_failing_workflows", "table"),
)
COST = (
    Panel("Spend by model", "panel_spend_by_model", "bar", "currencyUSD", "Priced costs, every day"),
    Panel("Spend by provider", "panel_spend_by_provider", "bar", "currencyUSD"),
    Panel("Spend by workflow", "panel_spend_by_workflow", "bar", "currencyUSD"),
    Panel("Spend per day", "panel_spend_by_day", "timeseries", "currencyUSD", "The last 30 days"),
    Panel("Budget burn", "panel_budget_burn", "table", "",
          "Executions with a budget, the closest to it first"),
    Panel("Unpriced usage by model", "panel_unpriced_usage", "bar", "short",
          "Cost events of models the price catalog does not know: their spend is not in the totals"),
)
INTEGRITY = (
    Panel("Last verification of each check", "panel_verifications", "table", "",
          "`runledger verify` runs, as kept in the verifications table"),
    Panel("Newest checkpoints", "panel_checkpoints", "table", "",
          "Signed tree heads of the transparency log"),
)


async def panel_rows(conn: asyncpg.Connection, panel: Panel) -> list[dict[str, Any]]:
    """The panel's rows, as Grafana would get them (the connection's search path names the schema)."""
    return [dict(r) for r in await conn.fetch(panel.sql)]
