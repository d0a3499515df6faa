"""`runledger report --html`: the dashboards' PostgreSQL panels as a page, looked at in a real headless browser;
and the role the dashboards read with."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest
from PIL import Image

from runledger.projections.postgres.panels import COST, EXECUTIONS, INTEGRITY
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.records import LogRecord
from tests.conftest import CLI
from tests.integration.conftest import FIRST_STREAM, rechain
from tests.integration.projections.test_verify import project

BAR = (0x25, 0x63, 0xEB)  # the bars' colour (streams/tools/htmlreport.py)


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    browser = shutil.which("chromium")
    assert browser is not None, "Debian's chromium is needed (apt-get install chromium; `./dev test` does as root)"
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
async def test_the_page_draws_every_panel_in_chromium(schema: str, pool: asyncpg.Pool, store: ProjectionStore,
                                                      env: dict[str, str], tmp_path: Path) -> None:
    await ProjectionStore.save_catalog(pool, store.catalog)
    await project(store)  # the vectors, from 2026-11-22: older than the panels' time windows, some day
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    current = rechain("current", [{**e, "time": now} for e in FIRST_STREAM])
    result = await store.apply_batch([LogRecord("t.events", 1, i, b"current", orjson.dumps(e))
                                      for i, e in enumerate(current)])
    assert len(result.projected) == len(current)
    run_env = {**os.environ, **env, "RUNLEDGER_DB_SCHEMA": schema}
    verified = subprocess.run([*CLI, "verify", "chains"], env=run_env, capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    page = tmp_path / "report.html"
    made = subprocess.run([*CLI, "report", "--html", str(page)], env=run_env, capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0 and made.stdout.strip() == str(page.resolve()), made.stderr

    dom = chromium("--dump-dom", page.as_uri()).stdout  # the page as the browser built it
    figures = re.findall(r"<figure class=\"panel (\w+)\" data-query=\"(\w+)\">(.*?)</figure>", dom, re.S)
    assert [q for _, q, _ in figures] == [p.query for p in (*EXECUTIONS, *COST, *INTEGRITY)]
    for kind, name, inner in figures:
        if name in ("panel_unpriced_usage", "panel_checkpoints", "panel_top_failing_workflows"):
            continue  # the vectors have no unpriced model, no checkpoint, and no failing workflow to show
        assert "no data" not in inner, f"{name} drew nothing"
        if kind == "bar":
            widths = [float(w) for w in re.findall(r"<rect [^>]*width=\"([\d.]+)\"", inner)]
            assert widths and max(widths) == 380.0, f"{name}: bars {widths}"
        elif kind == "timeseries":
            assert "<polyline" in inner and "<circle" in inner, name
        else:
            assert inner.count("<tr>") >= 2, name
    assert "chains" in dom and "intact" in dom  # the verification just run, in the integrity table

    past = tmp_path / "past.html"  # a range before every event: the ranged panels are empty, the others not
    made = subprocess.run([*CLI, "report", "--html", str(past), "--since", "2020-01-01T00:00:00Z", "--until",
                           "2020-02-01T00:00:00+01:00"], env=run_env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    backwards = subprocess.run([*CLI, "report", "--html", str(past), "--since", "2030-01-01T00:00:00Z"],
                               env=run_env, capture_output=True, text=True, timeout=120)
    assert backwards.returncode == 2 and "not before its end" in backwards.stderr, backwards.stderr
    text = past.read_text()
    assert "over 2020-01-01 00:00:00 to 2020-01-31 23:00:00 UTC" in text
    empty = re.findall(r"data-query='(\w+)'><figcaption>[^<]*</figcaption>(?:<p class='about'>[^<]*</p>)?"
                       r"<p class='empty'>no data</p>", text)
    assert {p.query for p in (*EXECUTIONS, *COST)} <= set(empty) and "panel_verifications" not in empty, empty

    shot = tmp_path / "report.png"
    taken = chromium(f"--screenshot={shot}", "--window-size=1000,3200", page.as_uri())
    assert shot.exists(), taken.stderr[-2000:]
    with Image.open(shot) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 24) or []
        bar_pixels = sum(count for count, color in colors if color == BAR)
    assert bar_pixels > 5000, f"only {bar_pixels} pixels of the bars' colour: the charts did not draw"
