"""The main job end to end, and ``runledger rebuild`` after it and under a live worker."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from runledger.projections.postgres.db import connect, migrate
from runledger.projections.postgres.panels import COST, EXECUTIONS, INTEGRITY, panel_rows
from runledger.projections.postgres.queries import query
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.pricing import load_tokencost_catalog
from runledger.projections.records import LogRecord
from runledger.streams.dev.fleet import simulate_fleet
from runledger.streams.producer.client import append_many
from runledger.streams.settings import Settings
from runledger.streams.tools import rebuild as rebuild_module
from runledger.streams.tools.rebuild import rebuild
from tests.conftest import CLI
from tests.integration.conftest import poll, rechain


@pytest.fixture
async def live(env: dict[str, str], settings: Settings) -> AsyncIterator[tuple[dict[str, str], Settings]]:
    """Settings with a schema and consumer group of this test's own; every schema made from it is dropped."""
    schema = f"l_{uuid.uuid4().hex[:10]}"
    env = {**env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}"}
    yield env, settings.model_copy(update={"db_schema": schema, "consumer_group": f"g-{schema}"})
    conn = await asyncpg.connect(settings.database_url)
    try:
        for (name,) in await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", f"{schema}%"):
            await conn.execute(f'DROP SCHEMA "{name}" CASCADE')
    finally:
        await conn.close()


def runledger(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


async def test_demo_then_rebuild_gives_equal_tables(live: tuple[dict[str, str], Settings], tmp_path: Path) -> None:
    env, settings = live
    key = tmp_path / "checkpoint.key"
    env = {**env, "RUNLEDGER_CHECKPOINT_KEY": str(key)}
    demo = await asyncio.to_thread(runledger, env, "demo", "--executions", "40", "--seed", "3")
    assert demo.returncode == 0, demo.stderr
    for heading in ("executions by status", "spend by model", "spend by workflow", "most expensive executions"):
        assert heading in demo.stdout
    assert "chains checked intact: 40 of 40" in demo.stdout
    hooks = re.search(r"webhooks: ([\d,]+) of ([\d,]+) events delivered to the demo's receiver .* signatures "
                      r"verified \(0 refused\), 0 streams out of seq order\n", demo.stdout)
    assert hooks is not None and hooks[1] == hooks[2], demo.stdout
    # a quarter of the fleet over HTTP, signed, through a real serve; projected and checked with the rest
    over_http = re.search(r"over HTTP: (\d+) of 40 executions \(([\d,]+) events\) in (\d+) signed requests to "
                          r"runledger serve at http://127\.0\.0\.1:\d+ as source (demo-\w+)", demo.stdout)
    assert over_http is not None, demo.stdout
    assert int(over_http[1]) == int(over_http[3]) == 10 and int(over_http[2].replace(",", "")) > 10
    conn = await asyncpg.connect(settings.database_url)
    try:
        projected = await conn.fetchval(f'SELECT count(*) FROM "{settings.db_schema}".audit_log WHERE source = $1',
                                        f"/demo/http/{over_http[4]}")
    finally:
        await conn.close()
    assert projected == int(over_http[2].replace(",", ""))  # written as the demo's HTTP source, by the server
    assert "acme/acme-internal-llm-v2" in demo.stdout and "unpriced" in demo.stdout
    assert f"created the checkpoint signer key {key}" in demo.stdout and key.with_suffix(".key.pub").is_file()
    assert re.search(r"\d+ checkpoints signed, one per log partition that grew: the transparency logs of [\d,]+ "
                     r"records", demo.stdout)
    assert re.search(r"verify chains: [\d,]+ events of 40 streams, intact", demo.stdout)
    page = Path(demo.stdout.rsplit("people without Grafana: ", 1)[1].split()[0])
    assert page.is_file() and "Spend by model" in page.read_text()
    end = datetime.now(UTC).replace(microsecond=0)  # Grafana writes its range in whole seconds
    start = end - timedelta(days=1)
    macros = {"$__timeFrom()": f"'{start:%Y-%m-%dT%H:%M:%SZ}'", "$__timeTo()": f"'{end:%Y-%m-%dT%H:%M:%SZ}'"}
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": settings.db_schema})
    try:  # every panel of the dashboards and the page has something to show after a demo
        for panel in (*EXECUTIONS, *COST, *INTEGRITY):
            rows = await panel_rows(conn, panel, start, end)
            assert rows, f"{panel.query} returns no rows after a demo"
            as_grafana = panel.grafana_sql  # with the time range as Grafana writes it in, in the same role
            for macro, literal in macros.items():
                as_grafana = as_grafana.replace(macro, literal)
            await conn.execute("SET ROLE runledger_reader")
            try:
                assert [dict(r) for r in await conn.fetch(as_grafana)] == rows, panel.query
            finally:
                await conn.execute("RESET ROLE")
            before = await panel_rows(conn, panel, start - timedelta(days=30), start)
            assert not before or not panel.ranged, f"{panel.query} shows rows from outside its time range"
    finally:
        await conn.close()

    done = await asyncio.to_thread(runledger, env, "rebuild", "--json")
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["switched"] and report["equal"]
    assert report["tables"]["executions"]["rebuilt_rows"] == 40
    again = await asyncio.to_thread(runledger, env, "rebuild", "--no-switch", "--json")
    assert again.returncode == 0, again.stderr
    assert orjson.loads(again.stdout)["tables"] == {  # the switched-in tables, as a projection of the log anew
        table: {**row, "live_md5": row["rebuilt_md5"]} for table, row in report["tables"].items()}


async def _live_worker(settings: Settings, stop: asyncio.Event) -> None:
    """The worker's path without Faust: read every partition, apply batches, offsets in PostgreSQL."""
    pool = await connect(settings.database_dsn("worker"), settings.db_schema)
    store = ProjectionStore(pool, load_tokencost_catalog(), settings.consumer_group)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(settings.events_topic, p) for p in range(settings.event_partitions)]
        consumer.assign(tps)
        for tp in tps:  # at once: a lazy seek_to_beginning can lose to the reset to the end that assign() starts
            consumer.seek(tp, 0)
        while not stop.is_set():
            fetched = await consumer.getmany(timeout_ms=100, max_records=300)
            batch = [LogRecord(m.topic, m.partition, m.offset, m.key, m.value or b"")
                     for ms in fetched.values() for m in ms]
            if batch:
                await store.apply_until_done(batch)
    finally:
        await consumer.stop()
        await pool.close()


async def test_rebuild_switches_under_a_live_worker_and_nothing_is_lost(
        live: tuple[dict[str, str], Settings]) -> None:
    _, settings = live
    await migrate(settings.database_url, settings.db_schema)
    before = simulate_fleet(60, seed=4, run_tag=f"{settings.db_schema}-a")
    during = simulate_fleet(60, seed=5, run_tag=f"{settings.db_schema}-b")
    total = sum(len(r.events) for r in before + during)
    await append_many(settings, [(r.stream_id, e) for r in before for e in r.events], progress=False)
    stop = asyncio.Event()
    worker = asyncio.create_task(_live_worker(settings, stop))

    async def trickle() -> None:  # appends go on while the rebuild runs and switches
        for run in during:
            await append_many(settings, [(run.stream_id, e) for e in run.events], progress=False)
            await asyncio.sleep(0.05)  # pacing, so that appends straddle the switch

    appending = asyncio.create_task(trickle())
    report = await rebuild(settings)
    assert report.switched and report.equal, report.as_dict()
    await appending
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": settings.db_schema})
    try:
        deadline = time.monotonic() + 60
        while (projected := await conn.fetchval("SELECT count(*) FROM audit_log")) < total:
            assert time.monotonic() < deadline, f"{projected} of {total} projected"
            await asyncio.sleep(0.2)
        stop.set()
        await worker
        assert await conn.fetchval("SELECT count(*) FROM executions") == 120
        assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0
        retired = await conn.fetchval(f'SELECT count(*) FROM "{report.retired_schema}".costs')
        assert retired < await conn.fetchval("SELECT count(*) FROM costs")  # so the switch came before the end
        assert report.lock_held_s is not None and report.lock_held_s < 1.0
        # After the switch the live tables still equal a fresh projection of the whole log.
        again = await rebuild(settings, switch=False)
        assert again.equal and again.checksums["audit_log"][0][0] == total
    finally:
        stop.set()
        await conn.close()


async def _project_all(settings: Settings, total: int, *, letters: int = 0) -> None:
    """Run the worker's path until ``total`` events are projected and ``letters`` records dead-lettered."""
    stop = asyncio.Event()
    worker = asyncio.create_task(_live_worker(settings, stop))
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": settings.db_schema})
    try:
        async def done() -> bool:
            return (await conn.fetchval("SELECT count(*) FROM audit_log") == total
                    and await conn.fetchval("SELECT count(*) FROM dead_letters") == letters)

        await poll(done, 60, f"{total} events projected and {letters} letters")
    finally:
        stop.set()
        await worker
        await conn.close()


async def _append_runs(settings: Settings, runs: int, seed: int) -> int:
    fleet = simulate_fleet(runs, seed=seed, run_tag=f"{settings.db_schema}-{seed}")
    await append_many(settings, [(r.stream_id, e) for r in fleet for e in r.events], progress=False)
    return sum(len(r.events) for r in fleet)


async def _rows(conn: asyncpg.Connection, sql: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await conn.fetch(sql)]


async def test_letters_resolutions_replays_and_the_transparency_log_survive_the_switch(
        live: tuple[dict[str, str], Settings], tmp_path: Path) -> None:
    env, settings = live
    env = {**env, "RUNLEDGER_CHECKPOINT_KEY": str(tmp_path / "checkpoint.key")}
    await migrate(settings.database_url, settings.db_schema)
    total = await _append_runs(settings, 20, seed=6)
    first, second = rechain(f"{settings.db_schema}-tampered")[:2]
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_idempotence=False)
    await producer.start()
    try:  # two records that fail for good, and an event parked behind one of them
        await producer.send_and_wait(settings.events_topic, b"not json", key=b"junk")
        for event in ({**first, "hash": "0" * 64}, second):
            await producer.send_and_wait(settings.events_topic, orjson.dumps(event), key=first["subject"].encode())
    finally:
        await producer.stop()
    await _project_all(settings, total, letters=2)
    resolved = runledger(env, "dlq", "resolve", "--reason", "invalid_json", "--note", "junk from a test", "--yes")
    assert resolved.returncode == 0, resolved.stderr
    replayed = runledger(env, "dlq", "replay", "--stream", first["subject"], "--yes", "--quiet")
    assert replayed.returncode in (0, 1), replayed.stderr  # it fails again: the bytes are what they were
    for args in (("keys", "init"), ("checkpoint", "--out", str(tmp_path / "before"))):
        assert (done := runledger(env, *args)).returncode == 0, done.stderr
    kept = ("SELECT * FROM dead_letters ORDER BY id", "SELECT * FROM dlq_replays ORDER BY id",
            "SELECT * FROM dlq_replay_items ORDER BY replay_id, dead_letter_id", "SELECT * FROM checkpoints",
            "SELECT * FROM log_trees ORDER BY id", "SELECT stream_id, seq, event_id FROM parked_events",
            "SELECT event_id, tree, leaf_index, recorded_at FROM audit_log ORDER BY tree, leaf_index")
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": settings.db_schema})
    try:
        before = [await _rows(conn, sql) for sql in kept]
        assert {r["status"] for r in await conn.fetch("SELECT status FROM dead_letters")} == {"resolved", "dead"}
        assert before[1] and before[2] and before[5], "a replay, its item and a parked event to carry over"
        report = await rebuild(settings)
        assert report.switched and report.equal, report.as_dict()
        assert [await _rows(conn, sql) for sql in kept] == before
    finally:
        await conn.close()
    notes = sorted((tmp_path / "before").iterdir())
    assert notes
    for check in (*(("verify", "--checkpoint", str(note)) for note in notes), ("verify", "chains"),
                  ("verify", "projection")):
        verified = runledger(env, *check)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    # The log itself holds the bad records the letters hold; PostgreSQL accounts for every record of it.
    log = orjson.loads(runledger(env, "verify", "log", "--json").stdout)
    assert log["findings"] and {f["code"] for f in log["findings"]} <= {"not_json", "hash_mismatch"}, log


async def _batches(worker: asyncpg.Connection, waits: list[float]) -> None:
    """A worker taking the apply lock for batch after batch: how long does each wait (``waits``)?"""
    while True:
        started = time.monotonic()
        async with worker.transaction():
            await worker.execute(query("apply_lock"))
        waits.append(time.monotonic() - started)
        await asyncio.sleep(0.02)


async def test_a_batch_in_flight_makes_the_switch_give_way_instead_of_stalling_the_workers(
        live: tuple[dict[str, str], Settings]) -> None:
    _, settings = live
    await migrate(settings.database_url, settings.db_schema)
    await _project_all(settings, await _append_runs(settings, 30, seed=7))
    path = {"search_path": settings.db_schema}
    batch, worker, watcher = [await asyncpg.connect(settings.database_url, server_settings=path) for _ in range(3)]
    waits: list[float] = []
    switching = asyncio.Event()

    async def long_batch() -> None:
        """A worker's batch that holds the apply lock for 2.5 s from the moment the rebuild wants to switch."""
        async with batch.transaction():
            await batch.execute(query("apply_lock"))

            async def switch_waiting() -> bool:
                return bool(await watcher.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                                   "AND mode = 'ExclusiveLock' AND NOT granted"))

            await poll(switch_waiting, 120, "the rebuild to ask for the apply lock")
            switching.set()
            await asyncio.sleep(2.5)  # the batch's own work, not a wait for a result

    holding = asyncio.create_task(long_batch())
    others = asyncio.create_task(_batches(worker, waits))
    try:
        report = await rebuild(settings)
        await holding
    finally:
        others.cancel()
        holding.cancel()
        for conn in (batch, worker, watcher):
            await conn.close()
    assert max(waits) < 1.0, f"a batch waited {max(waits):.2f} s for the apply lock"
    assert switching.is_set() and report.switched and report.switch_tries > 1, report.as_dict()


async def test_an_interrupted_rebuild_resumes_where_it_stopped(live: tuple[dict[str, str], Settings],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, settings = live
    await migrate(settings.database_url, settings.db_schema)
    total = await _append_runs(settings, 40, seed=8)
    await _project_all(settings, total)
    monkeypatch.setattr(rebuild_module, "_FETCH_RECORDS", 50)  # small batches, so that it can stop midway

    class Interrupted(Exception):
        pass

    def stop_midway(done: int, _: int) -> None:
        if done >= 100:
            raise Interrupted

    with pytest.raises(Interrupted):
        await rebuild(settings, progress=stop_midway)
    report = await rebuild(settings)
    assert report.switched and report.equal, report.as_dict()
    assert 100 <= report.resumed_from < total and report.records == total - report.resumed_from


async def test_a_stall_under_the_lock_is_cut_at_the_time_limit(live: tuple[dict[str, str], Settings],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _, settings = live
    await migrate(settings.database_url, settings.db_schema)
    await _project_all(settings, await _append_runs(settings, 20, seed=9))
    tree_size = rebuild_module._audit_size
    stalls = [3.0]

    async def stalling_tree_size(conn: asyncpg.Connection, schema: str) -> int:
        """Only the switch reads the tree's size: its first try stalls there, as on a broker that stops answering."""
        if stalls:
            await asyncio.sleep(stalls.pop())
        return await tree_size(conn, schema)

    monkeypatch.setattr(rebuild_module, "_audit_size", stalling_tree_size)
    worker = await asyncpg.connect(settings.database_url, server_settings={"search_path": settings.db_schema})
    waits: list[float] = []
    others = asyncio.create_task(_batches(worker, waits))
    try:
        report = await rebuild(settings)
    finally:
        others.cancel()
        await asyncio.gather(others, return_exceptions=True)
        await worker.close()
    assert not stalls and report.switched and report.switch_tries > 1, report.as_dict()
    assert max(waits) < 1.2, f"a batch waited {max(waits):.2f} s for the apply lock"


async def test_a_switch_cut_off_inside_its_apply_reads_those_records_again_and_switches(
        live: tuple[dict[str, str], Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    """The switch's time limit cuts it off while it applies records its consumer has fetched: the rebuild reads
    them again (they would otherwise be a hole that no later round fills, and it could never switch), catches up
    with what the live workers did meanwhile, switches, and the switched-in tables hold every event."""
    _, settings = live
    await migrate(settings.database_url, settings.db_schema)
    totals = [await _append_runs(settings, 20, seed=12)]
    await _project_all(settings, totals[-1])
    copy_catalogs, apply, compare = (rebuild_module._copy_catalogs, ProjectionStore.apply_until_done,
                                     rebuild_module._Rounds.compare)
    owners: list[asyncpg.Connection] = []
    steps: list[str] = []

    async def more_before_the_switch(owner: asyncpg.Connection, rebuilt: str) -> None:
        """Right before the switch the live tables move on: the switch has records to apply."""
        await copy_catalogs(owner, rebuilt)
        totals.append(totals[-1] + await _append_runs(settings, 5, seed=13))
        await _project_all(settings, totals[-1])
        owners.append(owner)

    async def stalling_apply(store: ProjectionStore, records: list[LogRecord]) -> Any:
        """The switch's first apply (under the live schema's lock, held by the owner's transaction) stalls."""
        if not steps and owners and owners[0].is_in_transaction():
            steps.append("stalled")
            await asyncio.sleep(60)  # cut off by the switch's time limit
        return await apply(store, records)

    async def more_after_the_stall(rounds: Any) -> int:
        """Meanwhile the live workers go on: what the rebuild reads next lies beyond the records cut off."""
        if steps == ["stalled"]:
            steps.append("caught up")
            totals.append(totals[-1] + await _append_runs(settings, 20, seed=14))
            await _project_all(settings, totals[-1])
        return int(await compare(rounds))

    monkeypatch.setattr(rebuild_module, "_copy_catalogs", more_before_the_switch)
    monkeypatch.setattr(ProjectionStore, "apply_until_done", stalling_apply)
    monkeypatch.setattr(rebuild_module._Rounds, "compare", more_after_the_stall)
    async with asyncio.timeout(180):  # without the seek back, a partition cut off can also wait for ever
        report = await rebuild(settings)
    assert steps == ["stalled", "caught up"], steps
    assert report.switched and report.equal and report.switch_tries > 1, report.as_dict()
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": settings.db_schema})
    try:
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == totals[-1]
        assert await conn.fetchval("SELECT count(*) FROM executions") == 45
    finally:
        await conn.close()
    again = await rebuild(settings, switch=False)  # the switched-in tables, against a projection of the log anew
    assert again.equal and again.checksums["executions"][1][0] == 45, again.as_dict()


async def test_a_rebuild_begun_under_other_rules_starts_over_and_two_never_run_at_once(
        live: tuple[dict[str, str], Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    _, settings = live
    await migrate(settings.database_url, settings.db_schema)
    total = await _append_runs(settings, 10, seed=10)
    await _project_all(settings, total)
    first = await rebuild(settings, switch=False)  # kept, to be resumed
    assert first.equal and not first.switched and first.records == total
    monkeypatch.setattr(rebuild_module, "fingerprint", lambda: "changed0rules")
    again = await rebuild(settings, switch=False)
    assert again.resumed_from == 0 and again.records == total  # dropped and begun again
    holder = await asyncpg.connect(settings.database_url)
    try:
        assert await holder.fetchval(query("rebuild_lock"), settings.db_schema)
        with pytest.raises(rebuild_module.RebuildFailed, match="another `runledger rebuild`"):
            await rebuild(settings)
    finally:
        await holder.close()
    resumed = await rebuild(settings)
    assert resumed.switched and resumed.resumed_from == total, resumed.as_dict()


async def test_a_demo_killed_stops_its_workers(live: tuple[dict[str, str], Settings]) -> None:
    env, _ = live
    demo = subprocess.Popen([*CLI, "demo", "--executions", "3000"], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert demo.stdout is not None
        pids: dict[str, int] = {}
        while len(pids) < 2 and (line := await asyncio.to_thread(demo.stdout.readline)):
            if line.startswith(("worker    started  pid ", "webhooks  started  pid ")):
                pids[line.split()[0]] = int(line.split()[3].rstrip(","))
        assert set(pids) == {"worker", "webhooks"}, "the demo never said it started its workers"
        demo.terminate()
        assert await asyncio.to_thread(demo.wait, 60) == 143

        for name, pid in pids.items():
            async def gone(pid: int = pid) -> bool | None:  # exited: gone, or a zombie init has not reaped
                try:
                    return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE or None
                except psutil.NoSuchProcess:
                    return True

            await poll(gone, 30, f"the demo's {name} (pid {pid}) to stop")
    finally:
        if demo.poll() is None:
            demo.kill()
        await asyncio.to_thread(demo.communicate)
