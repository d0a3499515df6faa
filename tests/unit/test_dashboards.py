"""The Grafana dashboards: the committed JSON is what the code builds, every query names a real metric or a
named panel query, and every datasource is one Grafana is provisioned with."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY

from runledger.projections.postgres.panels import COST, EXECUTIONS, INTEGRITY
from runledger.streams import metrics
from runledger.streams.dev.dashboards import DASHBOARDS_DIR, build

ROOT = Path(__file__).resolve().parents[2]


def targets(model: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for panel in model["panels"] for t in panel["targets"]]


def test_the_committed_dashboards_are_what_the_code_builds() -> None:
    built = build()
    assert sorted(built) == sorted(p.name for p in DASHBOARDS_DIR.glob("*.json"))
    for name, model in built.items():
        assert json.loads((DASHBOARDS_DIR / name).read_text()) == model, f"{name} is stale: run runledger dashboards"


def test_every_promql_names_metrics_that_exist() -> None:
    assert metrics.RECORDS is not None  # registered on import
    known = {m.name for m in REGISTRY.collect()} | {"up"}
    for name, model in build().items():
        for target in targets(model):
            if "expr" not in target:
                continue
            for metric in re.findall(r"\b(runledger_[a-z_]+|up)\b", target["expr"]):
                base = re.sub(r"_(bucket|total|count|sum)$", "", metric)
                assert base in known, f"{name}: {target['expr']} names {metric}, which no one exports"


def test_every_sql_panel_runs_a_named_panel_query_on_a_provisioned_datasource() -> None:
    panels = (*EXECUTIONS, *COST, *INTEGRITY)
    sql = {p.grafana_sql for p in panels}
    for panel in panels:  # Grafana's time picker sets the range of those that read one
        assert "$1" not in panel.grafana_sql and "$2" not in panel.grafana_sql
        assert ("$__timeFrom()" in panel.grafana_sql and "$__timeTo()" in panel.grafana_sql) == panel.ranged
    assert sum(p.ranged for p in panels) == len(EXECUTIONS) + len(COST)
    sources = yaml.safe_load((ROOT / "ops/grafana/provisioning/datasources/runledger.yml").read_text())
    uids = {s["uid"] for s in sources["datasources"]}
    used = set()
    for model in build().values():
        titles = [p["title"] for p in model["panels"]]
        assert len(titles) == len(set(titles))
        for panel in model["panels"]:
            assert panel["datasource"]["uid"] in uids
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and all(refs) and len(refs) == len(set(refs)), f"{panel['title']}: refIds {refs}"
            used |= {t["rawSql"] for t in panel["targets"] if "rawSql" in t}
    assert used == sql, "a panel of panels.py missing from the dashboards, or SQL that is not one of them"
