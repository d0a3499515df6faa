"""``runledger bench`` runs every path end to end and reports figures (the figures themselves are not judged)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import asyncpg
import orjson
import pytest

from runledger.streams.settings import Settings
from tests.conftest import CLI


async def _no_bench_schemas(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert not await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench\\_%'")
    finally:
        await conn.close()


def _bench(env: dict[str, str], *args: str) -> dict:  # type: ignore[type-arg]
    done = subprocess.run([*CLI, "bench", "--json", *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.slow
async def test_floor_and_store_rounds_with_their_spread(env: dict[str, str], settings: Settings) -> None:
    report = _bench(env, "--events", "1500", "--rounds", "2", "--no-worker")
    t = report["throughput"]
    assert t["rounds"] == 2 and t["events"] > 1000 and t["executions"] > 50
    assert set(t["events_per_s"]) == {"floor", "store"}
    for s in t["events_per_s"].values():
        assert len(s["rounds"]) == 2 and 0 < s["min"] <= s["median"] <= s["max"]
    assert 0 < t["share_of_floor"]["store"]["median"]
    assert "latency" not in report and report["machine"]["cpus"] >= 1
    await _no_bench_schemas(settings)


@pytest.mark.slow
async def test_workers_latency_memory_and_chart(env: dict[str, str], settings: Settings, tmp_path: Path) -> None:
    report = _bench(env, "--events", "1500", "--rounds", "1", "--workers", "1", "--rates", "300",
                    "--rate-seconds", "2", "--long", "1500", "--out", str(tmp_path))
    assert set(report["throughput"]["events_per_s"]) == {"floor", "store", "workers_1"}
    [row] = report["latency"]
    assert row["rate"] == 300 and row["events"] > 500 and 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert report["memory"]["events"] > 1000 and report["memory"]["samples"]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert orjson.loads((tmp_path / "bench.json").read_bytes()) == report
    await _no_bench_schemas(settings)


def test_bench_log_reports_both_rates_per_slice_and_deletes_its_topic(env: dict[str, str]) -> None:
    done = subprocess.run([*CLI, "bench-log", "--records", "2500", "--slice", "1000", "--partitions", "3",
                           "--keys", "20", "--batch", "50", "--json"], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    for name in ("produce", "consume"):
        s = report[name]
        assert len(s["per_slice"]) == 3 and all(rate > 0 for rate in s["per_slice"])
        assert s["min"] <= s["median"] <= s["max"] and s["last_over_first"] > 0
    assert report["records"] == 2500 and report["storage"] == "memory" and report["objects_per_partition"] is None
    assert "consumed 2,500 records" in done.stderr
    refused = subprocess.run([*CLI, "bench-log", "--records", "0"], env={**os.environ, **env},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "at least 1" in refused.stderr
