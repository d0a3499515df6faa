"""A PostgreSQL superuser's moves on a projected record, triggers off: each is caught by `runledger verify` (its
log check, or projection for the projected tables), named by stream and seq (or partition and offset, or table
and row), and no checkpoint signed afterwards covers it: the signer signs only what Kafka holds."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from runledger.projections.postgres.verify import verify_projection
from runledger.schemas.chain import compute_hash
from runledger.schemas.checkpoint import Signer
from runledger.schemas.errors import PermanentError
from runledger.schemas.merkle import ProofError, TreeState, leaf_hash
from runledger.schemas.proofs import check_proof
from runledger.streams.tools.checkpoints import create_signer_key, prove_inclusion, sign_round
from runledger.streams.tools.verifylog import verify_log
from tests.conftest import VECTOR_EVENTS
from tests.integration.conftest import KafkaLedger, independent_root, kafka_ledger, read_log, rechain

EXTRA = "moves-extra"


@pytest.fixture
async def ledger(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[KafkaLedger]:
    async with kafka_ledger(env, tmp_path / "keys", monkeypatch) as ledger:
        await ledger.append([*VECTOR_EVENTS, *rechain(EXTRA)])
        await ledger.project()
        create_signer_key(ledger.settings)
        done = await sign_round(ledger.settings, signer(ledger))
        assert done.signed and not done.refused and not done.findings
        await ledger.conn.execute("SET session_replication_role = replica")  # the superuser: triggers off
        yield ledger


def signer(ledger: KafkaLedger) -> Signer:
    return Signer.from_private_key(ledger.settings.checkpoint_key_path.read_text())


async def raw_of(ledger: KafkaLedger, stream: str, seq: int) -> dict[str, Any]:
    return dict(orjson.loads(await ledger.conn.fetchval(
        "SELECT raw FROM audit_log WHERE stream_id = $1 AND seq = $2", stream, seq)))


async def set_raw(ledger: KafkaLedger, event_id: str, event: dict[str, Any]) -> None:
    await ledger.conn.execute("UPDATE audit_log SET raw = $2, hash = $3, prevhash = $4, event_id = $5::uuid "
                              "WHERE event_id = $1::uuid", event_id, orjson.dumps(event), event["hash"],
                              event["prevhash"], event["id"])


Move = Callable[[KafkaLedger], Awaitable[set[tuple[Any, ...]]]]
"""A superuser's move; what `verify` must name: (check, stream, seq, code), or (check, partition, offset, code)."""


async def edit_data(ledger: KafkaLedger) -> set[tuple[Any, ...]]:
    event = await raw_of(ledger, EXTRA, 3)
    await ledger.conn.execute("UPDATE audit_log SET raw = $3 WHERE stream_id = $1 AND seq = $2", EXTRA, 3,
                              orjson.dumps({**event, "data": {**event["data"], "name": "edited"}}))
    return {("log", EXTRA, 3, "audit_differs")}


async def edit_cost(ledger: KafkaLedger) -> set[tuple[Any, ...]]:
    await ledger.conn.execute("UPDATE costs SET cost_usd = cost_usd + 1000 WHERE event_id = (SELECT event_id FROM "
                              "costs WHERE stream_id = $1 ORDER BY seq LIMIT 1)", EXTRA)
    return {("projection", EXTRA, None, "row_differs")}


async def delete_row(ledger: KafkaLedger) -> set[tuple[Any, ...]]:
    await ledger.conn.execute("DELETE FROM audit_log WHERE stream_id = $1 AND seq = 4", EXTRA)
    return {("log", EXTRA, 4, "record_unaccounted")}


async def swap_payloads(ledger: KafkaLedger) -> set[tuple[Any, ...]]:
    one, two = [await ledger.conn.fetchval("SELECT raw FROM audit_log WHERE stream_id = $1 AND seq = $2", EXTRA, n)
                for n in (1, 2)]
    await ledger.conn.execute("UPDATE audit_log SET raw = CASE seq WHEN 1 THEN $2::bytea ELSE $3::bytea END "
                              "WHERE stream_id = $1 AND seq IN (1, 2)", EXTRA, two, one)
    return {("log", EXTRA, 1, "audit_differs"), ("log", EXTRA, 2, "audit_differs")}


async def append_forged(ledger: KafkaLedger) -> set[tuple[Any, ...]]:
    """A hash-valid event after the stream's last one, with its head moved: the chains agree."""
    conn = ledger.conn
    last = await conn.fetchrow("SELECT * FROM audit_log WHERE stream_id = $1 ORDER BY seq DESC LIMIT 1", EXTRA)
    event = orjson.loads(last["raw"])
    forged = {**event, "id": "0b9c4cd4-5d3f-4a5e-8c7d-6e1f2a3b4c5d", "seq": event["seq"] + 1,
              "prevhash": event["hash"], "type": "step.skipped", "data": {"step_id": "forged"}}
    forged["hash"] = compute_hash(forged)
    await conn.execute(
        "INSERT INTO audit_log (event_id, stream_id, seq, type, source, specversion, datacontenttype, time, hash, "
        "raw, prevhash, kafka_topic, kafka_partition, kafka_offset, tree, leaf_index) SELECT $1::uuid, stream_id, "
        "$2, $3, source, specversion, datacontenttype, time, $4, $5, $6, kafka_topic, kafka_partition, "
        "kafka_offset + 1, tree, leaf_index + 1 FROM audit_log WHERE event_id = $7",
        forged["id"], forged["seq"], forged["type"], forged["hash"], orjson.dumps(forged), forged["prevhash"],
        last["event_id"])
    await conn.execute("UPDATE stream_heads SET seq = $2, hash = $3 WHERE stream_id = $1", EXTRA, forged["seq"],
                       forged["hash"])
    await conn.execute("UPDATE executions SET last_seq = $2, last_hash = $3 WHERE stream_id = $1", EXTRA,
                       forged["seq"], forged["hash"])
    return {("log", EXTRA, forged["seq"], "audit_not_in_log")}


async def rewrite_stream(ledger: KafkaLedger) -> set[tuple[Any, ...]]:
    """A stream rewritten with a consistent new chain, head and all."""
    rows = await ledger.conn.fetch("SELECT event_id::text, raw FROM audit_log WHERE stream_id = $1 ORDER BY seq",
                                   EXTRA)
    rewritten = rechain(EXTRA, [{**orjson.loads(r["raw"]), "source": "/producers/forger"} for r in rows])
    for row, event in zip(rows, rewritten, strict=True):
        await set_raw(ledger, row["event_id"], event)
    await ledger.conn.execute("UPDATE stream_heads SET hash = $2 WHERE stream_id = $1", EXTRA, rewritten[-1]["hash"])
    await ledger.conn.execute("UPDATE executions SET last_hash = $2 WHERE stream_id = $1", EXTRA,
                              rewritten[-1]["hash"])
    return {("log", EXTRA, e["seq"], "audit_differs") for e in rewritten}


async def delete_stream(ledger: KafkaLedger) -> set[tuple[Any, ...]]:
    stream = VECTOR_EVENTS[0]["subject"]
    seqs = [r[0] for r in await ledger.conn.fetch("SELECT seq FROM audit_log WHERE stream_id = $1", stream)]
    for table in ("costs", "artifacts", "steps", "audit_log", "stream_heads", "executions"):
        await ledger.conn.execute(f"DELETE FROM {table} WHERE stream_id = $1", stream)  # noqa: S608 - constants
    return {("log", stream, seq, "record_unaccounted") for seq in seqs}


async def rewrite_tree(ledger: KafkaLedger) -> set[tuple[Any, ...]]:
    """One partition's stored tree rewritten consistently: a leaf, every node above it, the peaks."""
    conn = ledger.conn
    tree = await conn.fetchrow("SELECT * FROM log_trees WHERE size > 4 ORDER BY partition LIMIT 1")
    leaves = [(bytes(r[0]), r[1]) for r in await conn.fetch(
        "SELECT hash, kafka_offset FROM log_tree_nodes WHERE tree = $1 AND level = 0 ORDER BY index", tree["id"])]
    leaves[2] = (leaf_hash(b"rewritten"), leaves[2][1])
    state = TreeState()
    nodes = [(tree["id"], level, index, h, offset if level == 0 else None)
             for leaf, offset in leaves for level, index, h in state.append(leaf)]
    await conn.execute("DELETE FROM log_tree_nodes WHERE tree = $1", tree["id"])
    await conn.copy_records_to_table("log_tree_nodes", records=nodes,
                                     columns=("tree", "level", "index", "hash", "kafka_offset"))
    await conn.execute("UPDATE log_trees SET peaks = $2 WHERE id = $1", tree["id"], state.peaks)
    return {("log", tree["partition"], leaves[2][1], "tree_leaf_differs"), ("log", tree["partition"], None,
                                                                            "tree_root_differs")}


async def rewrite_a_leaf(ledger: KafkaLedger) -> set[tuple[Any, ...]]:
    """One stored leaf changed, nothing above it: the peaks still fold to the log's root."""
    tree = await ledger.conn.fetchrow("SELECT * FROM log_trees WHERE size > 4 ORDER BY partition LIMIT 1")
    offset = await ledger.conn.fetchval("UPDATE log_tree_nodes SET hash = $2 WHERE tree = $1 AND level = 0 AND "
                                        "index = 3 RETURNING kafka_offset", tree["id"], leaf_hash(b"rewritten"))
    return {("log", tree["partition"], offset, "tree_leaf_differs")}


@pytest.mark.parametrize("move", [edit_data, edit_cost, delete_row, swap_payloads, append_forged, rewrite_stream,
                                  delete_stream, rewrite_tree, rewrite_a_leaf], ids=lambda m: m.__name__)
async def test_each_superuser_move_is_caught_and_never_signed(ledger: KafkaLedger, move: Move,
                                                              tmp_path: Path) -> None:
    expected = await move(ledger)
    check = next(iter(expected))[0]
    if check == "log":
        report = await verify_log(ledger.settings)
        found = {("log", f.stream_id or f.partition, f.seq if f.stream_id else f.offset, f.code)
                 for f in report.findings}
        if any(code.startswith("tree_root") for *_, code in expected):
            found = {(c, where, None if code == "tree_root_differs" else at, code) for c, where, at, code in found}
    else:
        report = await verify_projection(ledger.settings.database_url, ledger.settings.db_schema, full=True,
                                         attestations=tmp_path / "attested.json")
        found = {("projection", f.stream_id, None, f.code) for f in report.findings}
    assert found == expected, [f.as_dict() for f in report.findings]

    # The log grows; the next round signs only what Kafka holds: every root is the Kafka-derived one.
    await ledger.append(rechain("after-the-move"))
    await ledger.project()
    done = await sign_round(ledger.settings, signer(ledger))
    assert done.signed and not done.refused
    log = await read_log(ledger.settings)
    values: dict[int, list[bytes]] = {}
    for r in log:
        values.setdefault(r.partition, []).append(r.value or b"")
    for s in done.signed:
        assert s.checkpoint.root == independent_root(values[s.partition][:s.checkpoint.size])
    # What the move changed or forged is not on the log, and cannot be proven under any checkpoint.
    held = {(r.partition, r.offset): r.value for r in log}
    touched = [r["event_id"] for r in await ledger.conn.fetch(
        "SELECT event_id::text, kafka_partition, kafka_offset, raw FROM audit_log")
        if held.get((r["kafka_partition"], r["kafka_offset"])) != r["raw"]]
    assert bool(touched) == (move in (edit_data, swap_payloads, append_forged, rewrite_stream)), touched
    for event_id in touched:
        with pytest.raises((ProofError, PermanentError)):
            check_proof(await prove_inclusion(ledger.settings, event_id), signer(ledger).verifier_key)


async def test_a_record_on_its_way_through_the_retry_topics_is_no_finding(env: dict[str, str], tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from runledger.projections.records import LogRecord
    from runledger.streams.worker.retry import RetrySchedule, delay_name

    async with kafka_ledger(env, tmp_path / "keys", monkeypatch, partitions=1) as ledger:
        events = rechain("in-flight")
        await ledger.append([events[0], events[2], events[1]])  # seq 3 before seq 2: to the retry topics
        schedule = RetrySchedule(ledger.settings.topic_prefix, ledger.settings.retry_delays)
        log = await read_log(ledger.settings)
        result = await ledger.store.apply_batch([LogRecord(r.topic, r.partition, r.offset, r.key, r.value or b"")
                                                 for r in log[:2]], route=schedule.route)  # seq 2 not read yet
        assert [f.seq for f in result.retry] == [3]
        in_outbox = await verify_log(ledger.settings)  # its copy waits in the outbox
        assert in_outbox.intact and in_outbox.in_flight == 1, [f.as_dict() for f in in_outbox.findings]
        topic, key, value, headers = await ledger.conn.fetchrow("SELECT topic, key, value, headers FROM outbox")
        producer = AIOKafkaProducer(bootstrap_servers=ledger.settings.kafka_bootstrap_servers, acks="all")
        await producer.start()
        try:  # published: it waits in a retry topic that no consumer group read yet
            await producer.send_and_wait(topic, value, key=key,
                                         headers=[(k, v.encode()) for k, v in orjson.loads(headers).items()])
        finally:
            await producer.stop()
        await ledger.conn.execute("DELETE FROM outbox")
        in_topic = await verify_log(ledger.settings)
        assert in_topic.intact and in_topic.in_flight == 1, [f.as_dict() for f in in_topic.findings]
        delay = next(d for d, t in schedule.topics if t == topic)
        consumer = AIOKafkaConsumer(bootstrap_servers=ledger.settings.kafka_bootstrap_servers,
                                    group_id=f"{ledger.settings.consumer_group}.retry.{delay_name(delay)}",
                                    enable_auto_commit=False)
        await consumer.start()
        try:  # the retry topic's group read it, and it went nowhere: a record lost on its way is a finding
            consumer.assign([TopicPartition(topic, 0)])
            await consumer.commit({TopicPartition(topic, 0): 1})
        finally:
            await consumer.stop()
        lost = await verify_log(ledger.settings)
        assert [(f.stream_id, f.seq, f.code) for f in lost.findings] == [("in-flight", 3, "record_unaccounted")]
