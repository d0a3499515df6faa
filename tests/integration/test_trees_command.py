"""`runledger trees rebuild` on a database projected before migration 012 (offsets stored, no trees, audit rows
naming no leaf), against the real embedded broker: the workers' check holds such partitions back, the command
builds from Kafka the trees a projection with migration 012 builds, the check passes again, and a second run does
nothing. And `runledger offsets reset` retires the tree of a partition whose log was recreated."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from runledger.schemas.merkle import fold, leaf_hash, root_of
from runledger.streams.kafka import stop_consumer
from runledger.streams.tools import trees as trees_tool
from runledger.streams.worker.logcheck import TREES_FIX, check_partitions
from tests.conftest import VECTOR_EVENTS
from tests.integration.conftest import KafkaLedger, kafka_ledger, read_log, rechain


@pytest.fixture
async def ledger(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[KafkaLedger]:
    async with kafka_ledger(env, tmp_path / "keys", monkeypatch) as ledger:
        yield ledger


async def stored_state(conn: asyncpg.Connection) -> dict[str, Any]:
    """The current trees (size, next offset, peaks), every node, and every audit row's leaf, by partition."""
    return {
        "trees": {r["partition"]: (r["size"], r["next_offset"], [bytes(p) for p in r["peaks"]]) for r in
                  await conn.fetch("SELECT * FROM log_trees WHERE retired_at IS NULL")},
        "nodes": {(r["partition"], r["level"], r["index"]): (bytes(r["hash"]), r["kafka_offset"]) for r in
                  await conn.fetch("SELECT t.partition, n.* FROM log_tree_nodes n JOIN log_trees t ON t.id = n.tree "
                                   "WHERE t.retired_at IS NULL")},
        "audit": {r["event_id"]: (r["kafka_partition"], r["kafka_offset"], r["partition"], r["leaf_index"]) for r in
                  await conn.fetch("SELECT a.event_id::text, a.kafka_partition, a.kafka_offset, t.partition, "
                                   "a.leaf_index FROM audit_log a LEFT JOIN log_trees t ON t.id = a.tree")},
    }


async def assert_trees_of_the_log(ledger: KafkaLedger, state: dict[str, Any]) -> None:
    """Recomputed from the records alone: each partition's tree is RFC 9162's over its values, and each audit row
    names the leaf of its record."""
    records: dict[int, list[tuple[int, bytes]]] = {}
    for r in await read_log(ledger.settings):
        records.setdefault(r.partition, []).append((r.offset, r.value or b""))
    assert sorted(state["trees"]) == sorted(records)
    for partition, held in records.items():
        size, next_offset, peaks = state["trees"][partition]
        assert (size, next_offset) == (len(held), held[-1][0] + 1)
        assert fold(peaks) == root_of([leaf_hash(value) for _, value in held])
    index = {(p, offset): i for p, held in records.items() for i, (offset, _) in enumerate(held)}
    assert state["audit"] and all((p, index[p, offset]) == (tree_partition, leaf)
                                  for p, offset, tree_partition, leaf in state["audit"].values())


async def before_migration_012(conn: asyncpg.Connection) -> None:
    """What a database projected before migration 012 holds once migrated: no trees, audit rows without a leaf."""
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")  # past the append-only triggers
        await conn.execute("UPDATE audit_log SET tree = NULL, leaf_index = NULL")
        await conn.execute("DELETE FROM log_tree_nodes")
        await conn.execute("DELETE FROM log_trees")


async def worker_check(ledger: KafkaLedger) -> dict[int, Any]:
    """What a worker's check on assignment finds, from what its store loads."""
    stored, trees = await ledger.store.load_offsets_and_trees(ledger.settings.events_topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=ledger.settings.kafka_bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        checks = await check_partitions(consumer, ledger.settings.events_topic, [0, 1], stored, trees=trees)
    finally:
        await stop_consumer(consumer)
    return {c.partition: c for c in checks}


async def test_trees_rebuild_builds_the_trees_a_projection_builds(ledger: KafkaLedger,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    await ledger.append([*VECTOR_EVENTS, *rechain("trees-a"), b"not an event: a leaf all the same",
                         *rechain("trees-b"), *rechain("trees-c")])
    assert await ledger.project() > 0
    projected = await stored_state(ledger.conn)
    await assert_trees_of_the_log(ledger, projected)
    offsets = {r["partition"]: r["next_offset"] for r in await ledger.conn.fetch("SELECT * FROM consumer_offsets")}
    assert sorted(offsets) == [0, 1] and all(offsets.values())

    await before_migration_012(ledger.conn)
    for partition, check in (await worker_check(ledger)).items():
        assert check.problem is not None and check.fix == TREES_FIX, check
        assert (f"covers offsets up to 0 while the projections cover up to {offsets[partition]}"
                in check.problem), check.problem
    checked = ledger.run("offsets", "check", "--json")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert all("runledger trees rebuild" in orjson.loads(line)["fix"] for line in checked.stdout.splitlines())
    problems = await ledger.conn.fetch("SELECT partition, problem FROM log_problems")
    assert sorted(p["partition"] for p in problems) == [0, 1]
    assert all("runledger trees rebuild" in p["problem"] for p in problems)
    reset = ledger.run("offsets", "reset", "--yes")  # not the fix for a tree: it leaves the partitions alone
    assert reset.returncode == 0 and "nothing to reset" in reset.stderr, reset.stdout + reset.stderr

    await ledger.append(rechain("trees-pending"))  # produced while the workers hold the partitions back
    monkeypatch.setattr(trees_tool, "_CHUNK", 3)  # several chunks: the tree grows across them
    seen: list[tuple[int, int]] = []
    report = await trees_tool.rebuild_trees(ledger.settings, lambda done, total: seen.append((done, total)))
    assert {p.partition: (p.from_offset, p.to_offset, p.leaves_added, p.audit_rows) for p in report.partitions} == {
        partition: (0, offset, offset, sum(1 for a in projected["audit"].values() if a[0] == partition))
        for partition, offset in offsets.items()}
    assert seen[-1] == (sum(offsets.values()), sum(offsets.values()))
    assert await stored_state(ledger.conn) == projected  # what the projection built, node for node

    checked = ledger.run("offsets", "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert await ledger.conn.fetchval("SELECT count(*) FROM log_problems") == 0
    assert all(c.problem is None for c in (await worker_check(ledger)).values())
    again = ledger.run("trees", "rebuild", "--json")
    assert again.returncode == 0, again.stderr
    assert orjson.loads(again.stdout) == {"topic": ledger.settings.events_topic, "leaves_added": 0, "partitions": []}

    await ledger.append(rechain("trees-after"))  # the workers go on from the rebuilt trees
    await ledger.project()
    await assert_trees_of_the_log(ledger, await stored_state(ledger.conn))
    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # the append-only trigger is back
        await ledger.conn.execute("UPDATE audit_log SET leaf_index = leaf_index")


async def test_trees_rebuild_refuses_a_log_that_is_not_the_one_projected(ledger: KafkaLedger) -> None:
    await ledger.append(rechain("trees-other"))
    await ledger.project()
    await before_migration_012(ledger.conn)
    await ledger.conn.execute("UPDATE consumer_offsets SET last_sha256 = repeat('0', 64)")
    refused = ledger.run("trees", "rebuild")
    assert refused.returncode == 2 and "holds another record" in refused.stderr, refused.stderr
    assert await ledger.conn.fetchval("SELECT count(*) FROM log_tree_nodes") == 0  # rolled back
    assert await ledger.conn.fetchval("SELECT count(*) FROM audit_log WHERE tree IS NOT NULL") == 0


async def test_trees_rebuild_needs_migration_012(ledger: KafkaLedger) -> None:
    await ledger.conn.execute("DROP TABLE log_tree_nodes, log_trees CASCADE")
    refused = ledger.run("trees", "rebuild")
    assert refused.returncode == 2 and "runledger db migrate" in refused.stderr, refused.stderr


async def test_offsets_reset_retires_the_tree_of_the_recreated_log(ledger: KafkaLedger) -> None:
    await ledger.append(rechain("trees-reset"))
    await ledger.project()
    [(partition, old_tree, size)] = [tuple(r) for r in await ledger.conn.fetch(
        "SELECT partition, id, size FROM log_trees WHERE retired_at IS NULL")]
    # Another record where the last projected one was: the log topic was recreated and written again.
    await ledger.conn.execute("UPDATE consumer_offsets SET last_sha256 = repeat('0', 64)")
    reset = ledger.run("offsets", "reset", "--yes", "--json")
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert orjson.loads(reset.stdout) == {"partition": partition, "from": size, "to": 0}
    assert await ledger.conn.fetchval("SELECT retired_at IS NOT NULL FROM log_trees WHERE id = $1", old_tree)
    assert await ledger.conn.fetchval("SELECT count(*) FROM log_trees WHERE retired_at IS NULL") == 0
    assert ledger.run("offsets", "check").returncode == 0
    ledger._applied.clear()  # noqa: SLF001 - the worker reads the partition again from offset 0
    await ledger.project()
    [(new_tree, new_size)] = [tuple(r) for r in await ledger.conn.fetch(
        "SELECT id, size FROM log_trees WHERE retired_at IS NULL")]
    assert new_tree != old_tree and new_size == size  # a new tree of the log as it is now, from leaf 0
