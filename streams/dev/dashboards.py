"""runledger's Grafana dashboards as code (grafana-foundation-sdk), generated to ``ops/grafana/dashboards/*.json``
by ``runledger dashboards``: pipeline health and integrity from the workers' Prometheus metrics, executions and
cost from PostgreSQL with the panels of ``runledger.projections.postgres.panels`` (the HTML report's too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import barchart, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

from runledger.projections.postgres.panels import COST, EXECUTIONS, INTEGRITY, Panel

__all__ = ["DASHBOARDS_DIR", "build", "write"]

DASHBOARDS_DIR = Path(__file__).resolve().parents[2] / "ops" / "grafana" / "dashboards"
PROMETHEUS = DataSourceRef(type_val="prometheus", uid="prometheus")
POSTGRES = DataSourceRef(type_val="grafana-postgresql-datasource", uid="runledger-postgres")


class _SqlQuery(cogvariants.Dataquery):
    """A raw SQL target of Grafana's PostgreSQL datasource (the SDK has no builder for it)."""

    def __init__(self, sql: str, fmt: str) -> None:
        self.sql, self.fmt = sql, fmt

    def to_json(self) -> dict[str, object]:
        return {"refId": "A", "datasource": {"type": POSTGRES.type_val, "uid": POSTGRES.uid}, "rawSql": self.sql,
                "format": self.fmt, "rawQuery": True, "editorMode": "code"}


class _Sql(cogbuilder.Builder[cogvariants.Dataquery]):
    def __init__(self, sql: str, fmt: str) -> None:
        self._query = _SqlQuery(sql, fmt)

    def build(self) -> cogvariants.Dataquery:
        return self._query


def _promql(expr: str, legend: str = "") -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).range()
    return query.legend_format(legend) if legend else query


def _series(title: str, unit: str, *queries: prometheus.Dataquery, description: str = "") -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).datasource(PROMETHEUS).span(12).height(8)
    for ref, query in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(query.ref_id(ref))
    return panel.description(description) if description else panel


def _stat(title: str, unit: str, expr: str, legend: str = "") -> stat.Panel:
    return (stat.Panel().title(title).unit(unit).datasource(PROMETHEUS).span(6).height(5)
            .with_target(_promql(expr, legend).instant().ref_id("A")))


def _from_sql(panel: Panel) -> cogbuilder.Builder[Any]:
    """A PostgreSQL panel, from its shared definition."""
    built: Any
    if panel.kind == "timeseries":
        built = timeseries.Panel().unit(panel.unit).with_target(_Sql(panel.grafana_sql, "time_series"))
    elif panel.kind == "bar":
        built = barchart.Panel().unit(panel.unit).x_field("label").with_target(_Sql(panel.grafana_sql, "table"))
    else:
        built = table.Panel().with_target(_Sql(panel.grafana_sql, "table"))
    built = built.title(panel.title).datasource(POSTGRES).span(12).height(9)
    described: cogbuilder.Builder[Any] = built.description(panel.description) if panel.description else built
    return described


def _dashboard(uid: str, title: str, description: str, window: str) -> dashboard.Dashboard:
    return (dashboard.Dashboard(title).uid(uid).description(description).tags(["runledger"]).timezone("utc")
            .time(window, "now").refresh("30s").readonly())


def _quantile(q: float, metric: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket[5m])))"


def build() -> dict[str, dict[str, Any]]:
    """Every dashboard: file name -> Grafana's JSON model."""
    pipeline = _dashboard("runledger-pipeline", "runledger: pipeline health", "Throughput, lag, latency, "
                          "retries, dead letters, the outbox, the HTTP front door and webhook deliveries, from the "
                          "workers', serve's and the delivery workers' metrics", "now-6h")
    for panel in (
        _stat("Workers alive", "short", "max(runledger_workers_live)"),
        _stat("Records not yet projected", "short", "sum(runledger_consumer_lag_records)"),
        _stat("Open dead letters", "short", "max(runledger_dead_letters_open)"),
        _stat("Outbox backlog", "short", "max(runledger_outbox_backlog_records)"),
        _series("Throughput (events/s)", "short",
                _promql("sum(rate(runledger_events_projected_total[5m]))", "projected"),
                _promql("sum by (source) (rate(runledger_records_consumed_total[5m]))", "read from {{source}}"),
                _promql("sum(rate(runledger_events_duplicate_total[5m]))", "duplicates")),
        _series("Lag by partition (records not yet projected)", "short",
                _promql("sum by (partition) (runledger_consumer_lag_records)", "partition {{partition}}")),
        _series("End-to-end latency (event time to commit)", "s",
                _promql(_quantile(0.5, "runledger_event_latency_seconds"), "p50"),
                _promql(_quantile(0.99, "runledger_event_latency_seconds"), "p99")),
        _series("Batch commit time", "s", _promql(_quantile(0.5, "runledger_batch_commit_seconds"), "p50"),
                _promql(_quantile(0.99, "runledger_batch_commit_seconds"), "p99")),
        _series("Retries (events/s) and retry-topic depth", "short",
                _promql("sum by (delay) (rate(runledger_events_retried_total[5m]))", "retried after {{delay}}"),
                _promql("sum by (delay) (runledger_retry_topic_depth_records)", "waiting in {{delay}}")),
        _series("Dead letters by reason (per hour)", "short",
                _promql("sum by (reason) (increase(runledger_dead_letters_total[1h]))", "{{reason}}")),
        _series("Outbox backlog, and batches forwarded while PostgreSQL was unavailable", "short",
                _promql("max(runledger_outbox_backlog_records)", "copies to publish"),
                _promql("sum(increase(runledger_batches_forwarded_total[5m]))", "batches forwarded")),
        _series("Appends (events/s) and append time", "short",
                _promql("sum by (outcome) (rate(runledger_appends_total[5m]))", "{{outcome}}"),
                _promql(_quantile(0.99, "runledger_append_seconds"), "p99 append (s)"),
                description="From producers whose metrics Prometheus scrapes"),
        _series("HTTP front door: requests/s by status, and p99 latency", "short",
                _promql("sum by (status) (rate(runledger_http_requests_total[5m]))", "{{status}}"),
                _promql(_quantile(0.99, "runledger_http_request_seconds"), "p99 (s)"),
                description="Every `runledger serve` replica: requests answered by status, and the 99th percentile "
                "of request to response, over every route"),
        _stat("Webhook endpoints disabled", "short", 'max(runledger_webhook_endpoints{state="disabled"})'),
        _stat("Webhook deliveries dead", "short", "max(runledger_webhook_messages_dead)"),
        _series("Webhook deliveries (attempts/s by outcome) and messages owed", "short",
                _promql("sum by (outcome) (rate(runledger_webhook_attempts_total[5m]))", "{{outcome}}"),
                _promql("max(runledger_webhook_messages_owed)", "owed (pending or retrying)"),
                _promql('max(runledger_webhook_endpoints{state="failing"})', "endpoints failing"),
                description="Every delivery worker: delivered (2xx), retry (to a retry topic), dead (to the "
                "deliveries' dead-letter topic, held back until `runledger webhooks replay`)"),
        _series("Webhook latency: event time to the receiver's 2xx, and one attempt", "s",
                _promql(_quantile(0.5, "runledger_webhook_delivery_seconds"), "p50 event to 2xx"),
                _promql(_quantile(0.99, "runledger_webhook_delivery_seconds"), "p99 event to 2xx"),
                _promql(_quantile(0.99, "runledger_webhook_attempt_seconds"), "p99 attempt")),
    ):
        pipeline = pipeline.with_panel(panel)

    integrity = _dashboard("runledger-integrity", "runledger: integrity", "Verifications, checkpoints of the "
                           "transparency log and chain violations", "now-7d")
    for stat_panel in (
        _stat("Findings of the last verification", "short", "max by (check) (runledger_verify_findings)",
              "{{check}}"),
        _stat("Since the last verification", "s", "time() - max by (check) (runledger_verify_timestamp_seconds)",
              "{{check}}"),
        _stat("Since the newest checkpoint", "s", "time() - max(runledger_checkpoint_timestamp_seconds)"),
        _stat("Events not yet under a checkpoint", "short",
              "max(runledger_tlog_size_events) - max(runledger_checkpoint_size_events)"),
    ):
        integrity = integrity.with_panel(stat_panel)
    integrity = integrity.with_panel(_series(
        "Chain violations (per hour)", "short",
        _promql("sum by (code) (increase(runledger_chain_violations_total[1h]))", "{{code}}")))
    for sql_panel in INTEGRITY:
        integrity = integrity.with_panel(_from_sql(sql_panel))

    executions = _dashboard("runledger-executions", "runledger: executions", "Executions by status, durations "
                            "and failures, from PostgreSQL", "now-7d")
    for sql_panel in EXECUTIONS:
        executions = executions.with_panel(_from_sql(sql_panel))
    cost = _dashboard("runledger-cost", "runledger: cost", "Spend by model, provider, workflow and day, budgets "
                      "and unpriced usage, from PostgreSQL (numeric: exact to the last digit)", "now-30d")
    for sql_panel in COST:
        cost = cost.with_panel(_from_sql(sql_panel))

    return {f"{board.build().uid}.json": json.loads(json.dumps(board.build(), cls=JSONEncoder))
            for board in (pipeline, executions, cost, integrity)}


def write(directory: Path = DASHBOARDS_DIR) -> list[Path]:
    """Write every dashboard into ``directory``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in build().items():
        path = directory / name
        path.write_text(json.dumps(model, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
