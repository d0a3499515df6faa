"""The panels drawn from the projection tables: one definition for Grafana's dashboards and for the static HTML
report, so both show the same thing from the same SQL (the ``panel_*`` queries of ``sql/queries.sql``).

A panel's query gives, by its kind: ``timeseries`` (time, metric, value) rows, one line per metric; ``bar``
(label, value) rows; ``table`` any columns. A query over a time range takes its start and end as ``$1`` and
``$2`` (timestamptz): the report binds them, and Grafana gets the query with its time picker's macros in their
place (``grafana_sql``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from runledger.projections.postgres.queries import query

__all__ = ["COST", "EXECUTIONS", "INTEGRITY", "Panel", "panel_rows"]


_PARAMETER = re.compile(r"\$([12])(?!\d)")  # a ranged panel's only parameters: $1 (start) and $2 (end)


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

    @property
    def ranged(self) -> bool:
        """Whether the query reads a time range ($1 to $2)."""
        return _PARAMETER.search(self.sql) is not None

    @property
    def grafana_sql(self) -> str:
        """The query as Grafana's PostgreSQL datasource runs it: the dashboard's time range in place of $1, $2."""
        return _PARAMETER.sub(lambda m: "$__timeFrom()" if m.group(1) == "1" else "$__timeTo()", self.sql)


EXECUTIONS = (
    Panel("Executions started by status", "panel_executions_by_status", "timeseries", "short",
          "By the status each execution has now, in 120 intervals of the time range"),
    Panel("Median duration by workflow", "panel_duration_by_workflow", "bar", "s",
          "Executions started in the range that ended, from execution.started to their end"),
    Panel("Failure rate per day", "panel_failure_rate", "timeseries", "percent",
          "Executions started that day that failed or timed out, in percent"),
    Panel("Top failing workflows", "panel_top_failing_workflows", "table", "",
          "Executions started in the range that failed or timed out"),
)
COST = (
    Panel("Spend by model", "panel_spend_by_model", "bar", "currencyUSD", "Priced costs that occurred in the range"),
    Panel("Spend by provider", "panel_spend_by_provider", "bar", "currencyUSD"),
    Panel("Spend by workflow", "panel_spend_by_workflow", "bar", "currencyUSD"),
    Panel("Spend per day", "panel_spend_by_day", "timeseries", "currencyUSD", "Days cut in UTC"),
    Panel("Budget burn", "panel_budget_burn", "table", "",
          "Executions started in the range that have a budget, the closest to it first (all their spend)"),
    Panel("Unpriced usage by model", "panel_unpriced_usage", "bar", "short",
          "Cost events of models the price catalog does not know: their spend is not in the totals"),
)
INTEGRITY = (
    Panel("Last verification of each check", "panel_verifications", "table", "",
          "`runledger verify` runs, as kept in the verifications table"),
    Panel("Newest checkpoints", "panel_checkpoints", "table", "",
          "Signed tree heads of the transparency log"),
)


async def panel_rows(conn: asyncpg.Connection, panel: Panel, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """The panel's rows from ``start`` to ``end`` (if it reads a range), as Grafana would get them (the
    connection's search path names the schema)."""
    return [dict(r) for r in await conn.fetch(panel.sql, *((start, end) if panel.ranged else ()))]
