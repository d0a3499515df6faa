"""``runledger bench`` runs end to end and prints its figures (the figures themselves are not judged)."""

from __future__ import annotations

import os
import subprocess

import asyncpg
import orjson

from runledger.streams.settings import Settings
from tests.conftest import CLI


async def test_bench_prints_one_measurement_per_path_and_cleans_up(env: dict[str, str], settings: Settings) -> None:
    done = subprocess.run([*CLI, "bench", "--events", "1500", "--no-worker", "--json"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    rows = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert [r["name"].split()[0] for r in rows] == ["publish", "baseline", "projection"]
    assert len({r["events"] for r in rows}) == 1 and rows[0]["events"] > 1000
    assert all(r["events_per_s"] > 0 for r in rows)
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert not await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench\\_%'")
    finally:
        await conn.close()
