"""``runledger report --html FILE``: the dashboards' PostgreSQL panels as one static page, for people without
Grafana. The same panels from the same SQL (``runledger.projections.postgres.panels``), drawn as inline SVG: no
script, no network, one file to mail or archive. Money stays Decimal: a bar's length is computed in Decimal.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from runledger.projections.postgres.db import connect_one
from runledger.projections.postgres.panels import COST, EXECUTIONS, INTEGRITY, Panel, panel_rows
from runledger.streams.settings import Settings

__all__ = ["render", "write_report"]

_COLORS = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")
_WIDTH, _HEIGHT, _LEFT, _BOTTOM = 720, 260, 60, 30


_DEFAULT_DAYS = 30


async def write_report(settings: Settings, path: Path, start: datetime | None = None,
                       end: datetime | None = None) -> Path:
    """Run every panel's query from ``start`` (default: 30 days before ``end``) to ``end`` (default: now) in one
    snapshot of ``settings.db_schema`` and write the page to ``path``. Raises ValueError if the range is empty."""
    at = datetime.now(UTC)
    end = end or at
    start = start or end - timedelta(days=_DEFAULT_DAYS)
    if start >= end:
        raise ValueError(f"the range starts at {start.isoformat()}, not before its end {end.isoformat()} "
                         "(--since, --until)")
    conn = await connect_one(settings.database_dsn(), settings.db_schema)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            sections = [(title, [(panel, await panel_rows(conn, panel, start, end)) for panel in panels])
                        for title, panels in (("Executions", EXECUTIONS), ("Cost", COST), ("Integrity", INTEGRITY))]
    finally:
        await conn.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(settings.db_schema, at, (start, end), sections))
    return path


def render(schema: str, at: datetime, span: tuple[datetime, datetime],
           sections: list[tuple[str, list[tuple[Panel, list[dict[str, Any]]]]]]) -> str:
    """The page: a heading per section, a figure per panel (its chart, or its table, or 'no data')."""
    body = []
    for title, panels in sections:
        body.append(f"<h2>{_e(title)}</h2>")
        for panel, rows in panels:
            drawn = ("<p class='empty'>no data</p>" if not rows else
                     _lines(rows, panel.unit, span) if panel.kind == "timeseries" else
                     _bars(rows, panel.unit) if panel.kind == "bar" else _table(rows))
            about = f"<p class='about'>{_e(panel.description)}</p>" if panel.description else ""
            body.append(f"<figure class='panel {panel.kind}' data-query='{_e(panel.query)}'>"
                        f"<figcaption>{_e(panel.title)}</figcaption>{about}{drawn}</figure>")
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>runledger report: {_e(schema)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>runledger report</h1><p class='about'>schema {_e(schema)}, read {at:%Y-%m-%d %H:%M:%S} UTC in "
            "one snapshot; the panels of the executions, cost and integrity dashboards, from the same SQL, "
            f"over {_utc(span[0])} to {_utc(span[1])} UTC</p>"
            + "".join(body) + "</body></html>\n")


def _bars(rows: list[dict[str, Any]], unit: str) -> str:
    top = max((Decimal(r["value"]) for r in rows), default=Decimal(0)) or Decimal(1)
    height = 24 * len(rows) + 10
    parts = [f"<svg class='chart' width='{_WIDTH}' height='{height}' viewBox='0 0 {_WIDTH} {height}' role='img'>"]
    for i, row in enumerate(rows):
        value = Decimal(row["value"])
        length = (value / top * 380).quantize(Decimal("0.1")) if value > 0 else Decimal(0)
        y = 24 * i + 5
        parts.append(f"<text x='0' y='{y + 15}' class='label'>{_e(str(row['label'])[:40])}</text>"
                     f"<rect x='260' y='{y}' width='{length}' height='18' fill='{_COLORS[0]}'/>"
                     f"<text x='{Decimal(266) + length}' y='{y + 14}' class='value'>{_e(_fmt(value, unit))}</text>")
    return "".join(parts) + "</svg>"


def _lines(rows: list[dict[str, Any]], unit: str, span: tuple[datetime, datetime]) -> str:
    """A line per metric, over the report's time range (as Grafana draws its time axis)."""
    series: dict[str, list[tuple[datetime, Decimal]]] = {}
    for row in rows:
        series.setdefault(str(row["metric"]), []).append((row["time"], Decimal(row["value"])))
    start, end = span
    seconds = (end - start).total_seconds()  # write_report refuses an empty range
    top = max((v for points in series.values() for _, v in points), default=Decimal(0)) or Decimal(1)
    plot_w, plot_h = _WIDTH - _LEFT - 10, _HEIGHT - _BOTTOM - 10
    parts = [f"<svg class='chart' width='{_WIDTH}' height='{_HEIGHT + 20 * len(series)}' role='img'>",
             f"<line x1='{_LEFT}' y1='{10 + plot_h}' x2='{_LEFT + plot_w}' y2='{10 + plot_h}' class='axis'/>",
             f"<text x='0' y='16' class='value'>{_e(_fmt(top, unit))}</text>",
             f"<text x='{_LEFT}' y='{_HEIGHT - 8}' class='label'>{_utc(start)[:16]}</text>",
             f"<text x='{_WIDTH - 130}' y='{_HEIGHT - 8}' class='label'>{_utc(end)[:16]}</text>"]
    for n, (metric, points) in enumerate(sorted(series.items())):
        color = _COLORS[n % len(_COLORS)]
        xy = [(round(_LEFT + max((t - start).total_seconds(), 0.0) / seconds * plot_w, 1),
               (10 + plot_h - v / top * plot_h).quantize(Decimal("0.1"))) for t, v in sorted(points)]
        parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='2' "
                     f"points='{' '.join(f'{x},{y}' for x, y in xy)}'/>")
        parts += [f"<circle cx='{x}' cy='{y}' r='3' fill='{color}'/>" for x, y in xy]
        legend_y = _HEIGHT + 20 * n + 10
        parts.append(f"<rect x='{_LEFT}' y='{legend_y - 9}' width='10' height='10' fill='{color}'/>"
                     f"<text x='{_LEFT + 16}' y='{legend_y}' class='label'>{_e(metric)}</text>")
    return "".join(parts) + "</svg>"


def _table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(_cell(r[c]))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    if isinstance(value, datetime):
        return f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
    return "" if value is None else str(value)


def _fmt(value: Decimal, unit: str) -> str:
    if unit == "currencyUSD":
        return f"${value.quantize(Decimal('0.01')):,}"
    if unit == "percent":
        return f"{value.normalize():f} %"
    if unit == "s":
        return f"{value.normalize():f} s"
    return f"{value.normalize():f}"


def _utc(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S}"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px auto; max-width: 980px; color: #111827; }
h1 { margin-bottom: 0 } h2 { border-bottom: 1px solid #e5e7eb; margin-top: 32px }
figure.panel { margin: 18px 0; padding: 12px 16px; border: 1px solid #e5e7eb; border-radius: 6px }
figcaption { font-weight: 600; margin-bottom: 4px } p.about { color: #6b7280; margin: 0 0 8px }
p.empty { color: #9ca3af } svg .label { font-size: 12px; fill: #374151 } svg .value { font-size: 12px; fill: #111827 }
svg .axis { stroke: #9ca3af } table { border-collapse: collapse; font-size: 13px }
td, th { border: 1px solid #e5e7eb; padding: 3px 8px; text-align: left }
"""
