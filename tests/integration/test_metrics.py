"""A worker's Prometheus metrics, scraped over HTTP from real worker processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from runledger.projections.postgres.queries import query
from runledger.schemas.checkpoint import Signer
from runledger.streams.dev.fleet import simulate_fleet
from runledger.streams.producer.client import EventProducer
from runledger.streams.tools.checkpoints import create_signer_key
from tests.conftest import CLI, free_ports
from tests.integration.conftest import poll, running_worker, settings_of, worker_log


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at ``url``: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_two_workers_on_one_host_serve_what_they_did(env: dict[str, str], tmp_path: Path) -> None:
    schema = f"m_{uuid.uuid4().hex[:12]}"
    key = tmp_path / "checkpoint.key"
    key.write_text(Signer.generate("runledger.local/log").private_key)
    key.chmod(0o600)  # a signer key others may read is refused
    (port,) = free_ports(1)
    env = {**env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}",
           "RUNLEDGER_METRICS_PORT": str(port), "RUNLEDGER_CHECKPOINT_KEY": str(key),
           "RUNLEDGER_CHECKPOINT_INTERVAL_S": "1"}
    settings = settings_of(env)
    fleet = simulate_fleet(30, seed=4, run_tag=schema)
    total = sum(len(run.events) for run in fleet)
    async with EventProducer(settings) as producer:
        for run in fleet:
            await producer.append_batch(run.stream_id, run.events)
        await producer._kafka.send_and_wait(settings.events_topic, b"not json", key=b"junk")  # noqa: SLF001
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with running_worker(env) as first, running_worker(env) as second:
            async def urls() -> list[str] | None:
                try:
                    rows = await conn.fetch(f'SELECT metrics_url FROM "{schema}".workers ORDER BY metrics_url')
                except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError):
                    return None
                return [r["metrics_url"] for r in rows] if len(rows) == 2 else None

            served = await poll(urls, 120, "both workers to record where their metrics are")
            assert served == sorted({f"http://127.0.0.1:{port}/metrics", f"http://127.0.0.1:{port + 1}/metrics"})
            for worker in (first, second):
                assert "Prometheus metrics at http://127.0.0.1:" in worker_log(worker)

            async def projected() -> list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] | None:
                samples = [await asyncio.to_thread(scrape, url) for url in served]
                done = sum(s.get(("runledger_events_projected_total", ()), 0) for s in samples)
                dead = sum(s.get(("runledger_dead_letters_total", (("reason", "invalid_json"),)), 0) for s in samples)
                open_letters = [s.get(("runledger_dead_letters_open", ()), 0) for s in samples]
                signed = max(s.get(("runledger_checkpoint_size_events", ()), 0) for s in samples)
                # Every record is a leaf of its partition's tree, the one that is no event too.
                ready = done == total and dead == 1 and open_letters == [1, 1] and signed == total + 1
                return samples if ready else None

            samples = await poll(projected, 120, "every event projected and counted")
            done = await asyncio.to_thread(subprocess.run, [*CLI, "verify", "chains"], env={**os.environ, **env},
                                           capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr

            async def verified() -> float | None:
                last = await asyncio.to_thread(scrape, served[0])
                events = last.get(("runledger_verify_events", (("check", "chains"),)))
                return last[("runledger_verify_findings", (("check", "chains"),))] if events == total else None

            assert await poll(verified, 30, "the verification in the metrics") == 0
        both = {k: sum(s.get(k, 0) for s in samples) for k in samples[0].keys() | samples[1].keys()}
        assert both[("runledger_event_latency_seconds_count", ())] == total
        assert both[("runledger_records_consumed_total", (("source", "log"),))] == total + 1
        assert both[("runledger_batch_commit_seconds_count", ())] == both[("runledger_batch_records_count", ())] > 0
        assert both[("runledger_store_transactions_total", ())] >= both[("runledger_batch_records_count", ())]
        assert both[("runledger_events_duplicate_total", ())] == 0
        assert max(s[("runledger_tlog_size_events", ())] for s in samples) == total + 1
        assert max(s[("runledger_checkpoint_timestamp_seconds", ())] for s in samples) > 0
        assert [s[("runledger_workers_live", ())] for s in samples] == [2, 2]
        assert min(s[("runledger_store_read_timestamp_seconds", ())] for s in samples) > 0
        assert both[("runledger_batches_forwarded_total", ())] == 0
        partitions = {dict(labels)["partition"] for name, labels in both if name == "runledger_consumer_lag_records"}
        assert partitions and partitions <= {str(p) for p in range(settings.event_partitions)}
        assert all(value == 0 for (name, _), value in both.items() if name == "runledger_consumer_lag_records")
        assert not any("stream" in dict(labels) for _, labels in both), "a stream id is never a label"
        # Series born at 0, so that Prometheus' increase() sees their first event.
        assert both[("runledger_chain_violations_total", (("code", "chain_broken"),))] == 0
        assert both[("runledger_dead_letters_total", (("reason", "hash_mismatch"),))] == 0
        assert both[("runledger_events_retried_total", (("delay", "1s"),))] == 0
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def test_the_lag_counts_what_is_read_but_not_yet_projected(env: dict[str, str]) -> None:
    schema = f"m_{uuid.uuid4().hex[:12]}"
    (port,) = free_ports(1)
    env = {**env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}",
           "RUNLEDGER_METRICS_PORT": str(port)}
    settings = settings_of(env)
    url = f"http://127.0.0.1:{port}/metrics"
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with running_worker(env):
            async def serving() -> bool:
                return bool(await conn.fetchval(f'SELECT count(*) FROM "{schema}".workers'))  # noqa: S608

            await poll(lambda: _ignoring_missing_table(serving), 120, "the worker to start")
            fleet = simulate_fleet(10, seed=5, run_tag=schema)
            total = sum(len(run.events) for run in fleet)

            def lag_and_projected(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> tuple[float, float]:
                lag = sum(v for (name, _), v in samples.items() if name == "runledger_consumer_lag_records")
                return lag, samples.get(("runledger_events_projected_total", ()), 0)

            async with conn.transaction():  # what a rebuild's switch-over takes: no batch commits meanwhile
                await conn.execute(query("switch_lock"), schema)
                async with EventProducer(settings) as producer:
                    for run in fleet:
                        await producer.append_batch(run.stream_id, run.events)

                async def read_but_held() -> bool:
                    lag, projected = lag_and_projected(await asyncio.to_thread(scrape, url))
                    return lag == total and projected == 0

                await poll(read_but_held, 60, f"a lag of {total} while the batch cannot commit")

            async def caught_up() -> bool:
                return lag_and_projected(await asyncio.to_thread(scrape, url)) == (0, total)

            await poll(caught_up, 60, "no lag once everything is projected")
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def _ignoring_missing_table(check: Callable[[], Awaitable[bool]]) -> bool:
    try:
        return await check()
    except asyncpg.UndefinedTableError:
        return False


async def test_a_checkpoint_key_that_cannot_be_used_is_counted_and_never_stops_the_worker(
        env: dict[str, str], tmp_path: Path) -> None:
    """A signer key the worker cannot read, then two that are no key (text, and bytes that are not UTF-8): at every
    interval the worker logs it, counts it and goes on projecting; once the key is good, the next interval signs."""
    schema = f"m_{uuid.uuid4().hex[:12]}"
    key = tmp_path / "checkpoint.key"
    key.mkdir()  # a key file the worker cannot read (running as root, a mode of 000 would not stop it)
    (port,) = free_ports(1)
    env = {**env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}",
           "RUNLEDGER_METRICS_PORT": str(port), "RUNLEDGER_CHECKPOINT_KEY": str(key),
           "RUNLEDGER_CHECKPOINT_INTERVAL_S": "1"}
    settings = settings_of(env)
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with EventProducer(settings) as producer, running_worker(env) as worker:
            async def served() -> str | None:
                return await conn.fetchval(f'SELECT metrics_url FROM "{schema}".workers')  # noqa: S608

            url = await poll(lambda: _ignoring_missing_table(served), 120, "the worker to serve its metrics")

            async def errors(reason: str) -> float:
                return (await asyncio.to_thread(scrape, url)).get(
                    ("runledger_signer_key_errors_total", (("reason", reason),)), 0.0)

            for n, (reason, bad) in enumerate((("unreadable", None), ("invalid", b"PRIVATE+KEY+not a key\n"),
                                               ("invalid", b"\xff\xfe not UTF-8\n"))):
                if bad is not None:
                    if key.is_dir():
                        key.rmdir()
                    key.write_bytes(bad)
                    key.chmod(0o600)  # as a key file is kept: only what it holds is wrong
                before = await errors(reason)

                async def rising(reason: str = reason, before: float = before) -> bool:
                    return await errors(reason) >= before + 2  # counted at two intervals more

                await poll(rising, 60, f"runledger_signer_key_errors_total{{reason={reason!r}}} to rise")
                await producer.append(f"{schema}-{n}", "execution.started", {"workflow": "w"})

                async def projected(stream: str = f"{schema}-{n}") -> bool:
                    return bool(await conn.fetchval(f'SELECT count(*) FROM "{schema}".audit_log '  # noqa: S608
                                                    "WHERE stream_id = $1", stream))

                await poll(projected, 60, f"event {n + 1} projected while the key cannot be used")
                assert worker.poll() is None, worker_log(worker)
            assert "cannot be used (IsADirectoryError" in worker_log(worker)
            key.unlink()
            create_signer_key(settings)

            async def signed() -> bool:
                return bool(await conn.fetchval(f'SELECT count(*) FROM "{schema}".checkpoints '  # noqa: S608
                                                "WHERE kafka_partition IS NOT NULL"))

            await poll(signed, 60, "a checkpoint signed with the good key")
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
