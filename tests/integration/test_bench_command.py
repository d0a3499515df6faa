"""``runledger bench`` runs every path end to end and reports figures (the figures themselves are not judged);
its lock sampler sees a real lock wait, and survives losing its connection."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from runledger.streams.dev.benchlocks import SAMPLER_APPLICATION_NAME, LockSampler
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


def _sane_lock_waits(throughput: dict[str, Any], paths: set[str]) -> None:
    """Each worker path has a lock-wait share in [0, 1] per round with its spread, and its samples add up."""
    assert set(throughput["lock_wait"]) == paths
    for p in throughput["lock_wait"].values():
        assert p["failed_ticks"] == 0 and p["errors"] == [], p["errors"]
        assert len(p["per_round"]) == throughput["rounds"] and 0 <= p["waiting"] <= p["in_transaction"]
        assert all(r["ticks"] > 0 for r in p["per_round"])
        if p["in_transaction"]:  # a run this short may have no sample inside a transaction: then no share
            assert 0 <= p["min"] <= p["median"] <= p["max"] <= 1 and all(0 <= r <= 1 for r in p["rounds"])
        else:
            assert p["median"] is None and p["rounds"] == []
        assert sum(p["by_event"].values()) == p["waiting"] and 0 <= p["blocked_by_worker"] <= p["waiting"]
        assert (p["top_statement"] is None) == (p["waiting"] == 0)


async def _until(check: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout:.0f} s"
        await asyncio.sleep(0.02)


async def _samplers(admin: asyncpg.Connection) -> int:
    return int(await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                                    SAMPLER_APPLICATION_NAME))


async def test_the_sampler_sees_a_worker_wait_for_a_row_another_holds_and_closes_its_connection(
        settings: Settings) -> None:
    name, schema = f"bench-test {uuid.uuid4().hex[:8]}", f"benchtest_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(settings.database_url)
    holder = await asyncpg.connect(settings.database_url, server_settings={"application_name": name})
    waiter = await asyncpg.connect(settings.database_url, server_settings={"application_name": name})
    try:
        await admin.execute(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.state (size bigint);"
                            f"INSERT INTO {schema}.state VALUES (0)")
        sampler = LockSampler(settings.database_url, name, every=0.02)
        async with sampler:
            lock = holder.transaction()
            await lock.start()
            await holder.execute(f"SELECT size FROM {schema}.state FOR UPDATE")
            waiting = asyncio.create_task(waiter.execute(f"SELECT size FROM {schema}.state FOR UPDATE"))

            async def seen() -> bool:
                return any(t.waits for t in sampler.ticks)

            await _until(seen, "a sampled lock wait")
            await lock.commit()
            await waiting
            assert await _samplers(admin) == 1
        summary = sampler.summary()
        assert summary["failed_ticks"] == 0 and summary["errors"] == []
        assert summary["waiting"] >= 1 and 0 < summary["share"] <= 1
        assert summary["by_event"].get("transactionid", 0) >= 1 and summary["blocked_by_worker"] >= 1
        assert summary["statements"][0][0] == f"SELECT size FROM {schema}.state FOR UPDATE"

        async def closed() -> bool:
            return await _samplers(admin) == 0

        await _until(closed, "the sampler's connection closing")
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        for conn in (holder, waiter, admin):
            await conn.close()


async def test_a_sampler_whose_connection_is_cut_reports_it_and_does_not_raise(settings: Settings) -> None:
    admin = await asyncpg.connect(settings.database_url)
    try:
        sampler = LockSampler(settings.database_url, "nobody", every=0.02)
        async with sampler:

            async def ticking() -> bool:
                return len(sampler.ticks) >= 2

            await _until(ticking, "two samples")
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                                SAMPLER_APPLICATION_NAME)

            async def failed() -> bool:
                return sampler.failed_ticks > 0

            await _until(failed, "a failed sample")
        assert sampler.errors and all("sample" in e for e in sampler.errors), sampler.errors
        assert sampler.summary()["failed_ticks"] == sampler.failed_ticks
    finally:
        await admin.close()


@pytest.mark.slow
async def test_floor_and_store_rounds_with_their_spread(env: dict[str, str], settings: Settings) -> None:
    report = _bench(env, "--events", "1500", "--rounds", "2", "--no-worker")
    t = report["throughput"]
    assert t["rounds"] == 2 and t["events"] > 1000 and t["executions"] > 50
    assert set(t["events_per_s"]) == {"floor", "store"}
    for s in t["events_per_s"].values():
        assert len(s["rounds"]) == 2 and 0 < s["min"] <= s["median"] <= s["max"]
    assert 0 < t["share_of_floor"]["store"]["median"]
    assert "latency" not in report and report["machine"]["cpus"] >= 1 and t["lock_wait"] == {}
    await _no_bench_schemas(settings)


@pytest.mark.slow
async def test_workers_latency_memory_and_chart(env: dict[str, str], settings: Settings, tmp_path: Path) -> None:
    report = _bench(env, "--events", "1500", "--rounds", "1", "--workers", "1,2", "--rates", "300",
                    "--rate-seconds", "2", "--long", "1500", "--out", str(tmp_path))
    assert set(report["throughput"]["events_per_s"]) == {"floor", "store", "workers_1", "workers_2"}
    _sane_lock_waits(report["throughput"], {"workers_1", "workers_2"})
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


async def test_bench_http_measures_a_serve_of_its_own_and_drops_its_schema(env: dict[str, str],
                                                                          settings: Settings) -> None:
    """With tiny numbers: every measurement is there with its spread, every request answered 2xx (the figures
    themselves are not judged)."""
    args = ["--runs", "2", "--batches", "3", "--batch", "10", "--concurrency", "2", "--single-rate", "20",
            "--single-seconds", "1", "--single-streams", "2", "--read-rate", "10", "--read-seconds", "0.5"]
    done = await asyncio.to_thread(subprocess.run, [*CLI, "bench-http", "--json", *args], env={**os.environ, **env},
                                   capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["server"]["started_by_bench"] and report["client"]["processes"] == 1
    b = report["batches"]
    assert [r["events"] for r in b["per_run"]] == [30, 30] and all(r["failed"] == 0 for r in b["per_run"])
    assert 0 < b["events_per_s"]["min"] <= b["events_per_s"]["median"] <= b["events_per_s"]["max"]
    s = report["single"]
    assert [(r["requests"], r["ok"], r["failed"]) for r in s["per_run"]] == [(20, 20, 0)] * 2
    assert 0 < s["p50_ms"]["min"] and s["p99_ms"]["max"] <= s["max_ms"]["max"]
    reads = report["reads"]["endpoints"]
    assert set(reads) == {"list", "execution", "events", "proof", "checkpoints"}
    for e in reads.values():
        assert [(r["requests"], r["ok"]) for r in e["per_run"]] == [(5, 5)] * 2, e
    assert "bench-http" in report["command"]
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert not await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'benchhttp\\_%'")
    finally:
        await conn.close()
    refused = subprocess.run([*CLI, "bench-http", "--runs", "0"], env={**os.environ, **env}, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "above 0" in refused.stderr


async def test_bench_webhooks_measures_a_delivery_worker_and_drops_its_schema(env: dict[str, str],
                                                                             settings: Settings) -> None:
    """With tiny numbers: both measurements with their spread, every event delivered (the bench waits for each);
    the figures themselves are not judged."""
    args = ["--runs", "2", "--events", "200", "--streams", "10", "--rate", "50", "--seconds", "1",
            "--latency-streams", "5"]
    done = await asyncio.to_thread(subprocess.run, [*CLI, "bench-webhooks", "--json", *args],
                                   env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    t, lat = report["throughput"], report["latency"]
    assert (t["events"], t["streams"], len(t["worker_cpu_s"])) == (200, 10, 2)
    assert 0 < t["deliveries_per_s"]["min"] <= t["deliveries_per_s"]["median"] <= t["deliveries_per_s"]["max"]
    assert 0 < lat["p50"]["min"] and lat["p99"]["max"] <= lat["max"]["max"] and len(lat["worker_cpu_s"]) == 2
    assert "bench-webhooks" in report["command"] and "throughput run 2" in done.stderr
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert not await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'benchhooks\\_%'")
    finally:
        await conn.close()
    refused = subprocess.run([*CLI, "bench-webhooks", "--events", "0"], env={**os.environ, **env},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "above 0" in refused.stderr
