"""`runledger keys`, `checkpoint`, `prove`, `prove-consistency`, `verify-proof` and `verify --checkpoint`: one
signed tree per log partition, derived from Kafka, that an auditor checks with the verifier key alone."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from runledger.schemas.checkpoint import Checkpoint, Signer, Verifier
from runledger.schemas.logtrees import FRONTIER_HEADER
from runledger.schemas.merkle import TreeState, leaf_hash
from tests.conftest import CLI, VECTOR_EVENTS
from tests.integration.conftest import (
    KafkaLedger,
    auditor_code,
    independent_root,
    kafka_ledger,
    poll,
    read_log,
    rechain,
)


@pytest.fixture
async def ledger(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[KafkaLedger]:
    async with kafka_ledger(env, tmp_path / "keys", monkeypatch) as ledger:
        yield ledger


async def partition_values(ledger: KafkaLedger) -> dict[int, list[bytes]]:
    values: dict[int, list[bytes]] = {}
    for r in await read_log(ledger.settings):
        values.setdefault(r.partition, []).append(r.value or b"")
    return values


async def test_each_partition_is_signed_from_kafka_and_its_proofs_verify(ledger: KafkaLedger,
                                                                        tmp_path: Path) -> None:
    await ledger.append([*VECTOR_EVENTS, b"not an event: a leaf all the same"])
    await ledger.project()
    run, key = ledger.run, tmp_path / "keys" / "checkpoint.key"
    missing = run("checkpoint")
    assert missing.returncode == 2 and "runledger keys init" in missing.stderr
    assert run("keys", "init").returncode == 0
    assert key.stat().st_mode & 0o777 == 0o600
    assert run("keys", "init").returncode == 2  # never replaced by accident
    verifier_key = Path(f"{key}.pub").read_text().strip()
    assert run("keys", "show").stdout.strip() == verifier_key
    signed = run("checkpoint", "--json", "--out", str(tmp_path / "cps"))
    assert signed.returncode == 0, signed.stderr
    report = orjson.loads(signed.stdout)
    values = await partition_values(ledger)
    topic = ledger.settings.events_topic
    verifier = Verifier(verifier_key)
    assert sorted(s["partition"] for s in report["signed"]) == sorted(values)
    for s in report["signed"]:  # the auditor's own tree over Kafka's records gives the signed root
        checkpoint = verifier.open(s["note"], origin=f"runledger.test/log/{topic}/{s['partition']}")
        assert (checkpoint.size, checkpoint.root) == (len(values[s["partition"]]),
                                                      independent_root(values[s["partition"]]))
        assert (tmp_path / "cps" / f"{topic}-{s['partition']}-{checkpoint.size}.note").read_text() == s["note"]
    published = await read_log(ledger.settings, ledger.settings.checkpoints_topic)
    assert sorted(r.value.decode() for r in published if r.value) == sorted(s["note"] for s in report["signed"])
    assert all(dict(r.headers)[FRONTIER_HEADER] for r in published)  # the frontier beside each note
    again = run("checkpoint", "--json")  # nothing grew: nothing signed
    assert again.returncode == 0 and orjson.loads(again.stdout)["signed"] == []

    # More events, more checkpoints; proofs made from PostgreSQL's trees, checked offline.
    await ledger.append(rechain("extra"))
    await ledger.project()
    first = {s["partition"]: s["note"] for s in report["signed"]}
    assert run("checkpoint").returncode == 0
    event_id = VECTOR_EVENTS[4]["id"]
    assert run("prove", event_id, "--out", str(tmp_path / "inc.json")).returncode == 0
    ok = run("verify-proof", str(tmp_path / "inc.json"), "--key", verifier_key, "--json")
    assert ok.returncode == 0, ok.stdout
    proven = orjson.loads(ok.stdout)
    assert proven["event_id"] == event_id and proven["origin"].startswith(f"runledger.test/log/{topic}/")
    partition = int(proven["origin"].rsplit("/", 1)[1])
    auditor = auditor_code()  # docs/proofs.md's own code checks the proof too
    document = orjson.loads((tmp_path / "inc.json").read_bytes())
    size, root = auditor["open_checkpoint"](document["checkpoint"], verifier_key, proven["origin"])
    leaf = hashlib.sha256(b"\x00" + base64.b64decode(document["event"])).digest()
    assert auditor["root_from_inclusion"](document["leaf_index"], size, leaf,
                                          [base64.b64decode(p) for p in document["proof"]]) == root
    (tmp_path / "old.note").write_text(first[partition])
    assert run("prove-consistency", str(tmp_path / "old.note"), "--out", str(tmp_path / "con.json")).returncode == 0
    ok = run("verify-proof", str(tmp_path / "con.json"), "--json")  # the key from beside the signer key
    assert ok.returncode == 0 and orjson.loads(ok.stdout)["old_size"] == Checkpoint.parse(first[partition]).size
    wrong_origin = run("verify-proof", str(tmp_path / "inc.json"), "--origin", "another.log")
    assert wrong_origin.returncode == 1 and "another.log" in wrong_origin.stdout

    def tampered(name: str, change: Callable[[dict[str, Any]], None]) -> str:
        document = orjson.loads((tmp_path / name).read_bytes())
        change(document)
        (tmp_path / "bad.json").write_bytes(orjson.dumps(document))
        bad = run("verify-proof", str(tmp_path / "bad.json"), "--key", verifier_key)
        assert bad.returncode == 1 and "NOT PROVEN" in bad.stdout, (name, bad.stdout)
        return bad.stdout

    def flip(document: dict[str, Any]) -> None:
        first = base64.b64decode(document["proof"][0])
        document["proof"][0] = base64.b64encode(bytes([first[0] ^ 1]) + first[1:]).decode()

    def other_event(document: dict[str, Any]) -> None:
        document["event"] = base64.b64encode(orjson.dumps(VECTOR_EVENTS[5])).decode()

    def other_partition(document: dict[str, Any]) -> None:
        document["partition"] += 1

    for name, change in (("inc.json", flip), ("inc.json", other_event), ("con.json", flip),
                         ("inc.json", other_partition)):
        tampered(name, change)
    other_key = Signer.generate("runledger.test/log").verifier_key
    refused = run("verify-proof", str(tmp_path / "inc.json"), "--key", other_key)
    assert refused.returncode == 1 and "no signature" in refused.stdout


async def test_the_signer_signs_the_log_when_postgresql_disagrees(ledger: KafkaLedger, tmp_path: Path) -> None:
    await ledger.append(VECTOR_EVENTS)
    await ledger.project()
    assert ledger.run("keys", "init").returncode == 0
    assert ledger.run("checkpoint").returncode == 0
    # A superuser rewrites a partition's tree in PostgreSQL consistently: one leaf, every node above it, the peaks.
    conn = ledger.conn
    await conn.execute("SET session_replication_role = replica")
    tree = await conn.fetchrow("SELECT * FROM log_trees WHERE size > 2 ORDER BY size DESC LIMIT 1")
    leaves = [bytes(r[0]) for r in await conn.fetch(
        "SELECT hash FROM log_tree_nodes WHERE tree = $1 AND level = 0 ORDER BY index", tree["id"])]
    leaves[1] = leaf_hash(b"rewritten")
    state = TreeState()
    nodes = [(tree["id"], level, index, h, index if level == 0 else None)
             for leaf in leaves for level, index, h in state.append(leaf)]
    await conn.execute("DELETE FROM log_tree_nodes WHERE tree = $1", tree["id"])
    await conn.copy_records_to_table("log_tree_nodes", records=nodes,
                                     columns=("tree", "level", "index", "hash", "kafka_offset"))
    await conn.execute("UPDATE log_trees SET peaks = $2 WHERE id = $1", tree["id"], state.peaks)
    await conn.execute("SET session_replication_role = origin")
    await ledger.append(rechain("after"))  # the log grows: the next round signs
    await ledger.project()
    caught = ledger.run("checkpoint", "--json")
    assert caught.returncode == 1, caught.stderr
    report = orjson.loads(caught.stdout)
    assert [d["partition"] for d in report["disagreements"]] == [tree["partition"]]
    values = await partition_values(ledger)
    signed = {s["partition"]: Checkpoint.parse(s["note"]) for s in report["signed"]}
    if tree["partition"] in signed:  # signed over: the log's root, never PostgreSQL's
        assert signed[tree["partition"]].root == independent_root(values[tree["partition"]])
    finding = await conn.fetchrow("SELECT * FROM tree_findings")
    assert finding["origin"].endswith(f"/{tree['partition']}") and "root" in finding["finding"]
    # A proof whose path runs through the rewritten leaf is refused before it is written.
    neighbour = await conn.fetchval("SELECT event_id::text FROM audit_log WHERE tree = $1 AND leaf_index = 0",
                                    tree["id"])
    refused = ledger.run("prove", neighbour, "--out", str(tmp_path / "inc.json"))
    assert refused.returncode == 1 and "does not verify" in refused.stderr and not (tmp_path / "inc.json").exists()


async def test_the_signer_never_signs_two_roots_for_one_size(ledger: KafkaLedger) -> None:
    await ledger.append(VECTOR_EVENTS)
    await ledger.project()
    assert ledger.run("keys", "init").returncode == 0
    signer = Signer.from_private_key(ledger.settings.checkpoint_key_path.read_text())
    values = await partition_values(ledger)
    partition = max(values, key=lambda p: len(values[p]))
    topic = ledger.settings.events_topic
    # A checkpoint this key signed of the partition's size, of another log (the log was rewritten since), without
    # a frontier: the signer derives the tree again from the start and meets a size it signed.
    other = Checkpoint(f"runledger.test/log/{topic}/{partition}", len(values[partition]),
                       independent_root([b"another", *values[partition][1:]]))
    producer = AIOKafkaProducer(bootstrap_servers=ledger.settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(ledger.settings.checkpoints_topic, signer.sign(other).encode(),
                                     key=other.origin.encode())
    finally:
        await producer.stop()
    refused = ledger.run("checkpoint", "--json")
    assert refused.returncode == 1
    report = orjson.loads(refused.stdout)
    assert str(partition) in report["refused"] and "rewritten" in report["refused"][str(partition)]
    assert partition not in [s["partition"] for s in report["signed"]]
    sizes = [Checkpoint.parse(r.value.decode()).size for r in await read_log(
        ledger.settings, ledger.settings.checkpoints_topic) if r.key == other.origin.encode()]
    assert sizes == [other.size]  # nothing else signed for that partition


async def test_verify_against_a_checkpoint_catches_a_rewritten_stream_and_a_deleted_one(
        ledger: KafkaLedger, tmp_path: Path) -> None:
    await ledger.append([*VECTOR_EVENTS, *rechain("extra")])
    await ledger.project()
    run, conn = ledger.run, ledger.conn
    assert run("keys", "init").returncode == 0
    report = orjson.loads(run("checkpoint", "--json").stdout)
    extra = await conn.fetchval("SELECT kafka_partition FROM audit_log WHERE stream_id = 'extra' LIMIT 1")
    note = next(s["note"] for s in report["signed"] if s["partition"] == extra)
    (tmp_path / "cp.txt").write_text(note)
    intact = run("verify", "--checkpoint", str(tmp_path / "cp.txt"))
    assert intact.returncode == 0 and "checked" in intact.stdout, intact.stdout + intact.stderr
    assert run("verify").returncode == 2  # a check or a checkpoint

    # A superuser rewrites stream "extra" with a consistent new chain: new data, hashes, links, heads.
    await conn.execute("SET session_replication_role = replica")
    rows = await conn.fetch("SELECT event_id::text, raw FROM audit_log WHERE stream_id = 'extra' ORDER BY seq")
    rewritten = rechain("extra", [{**orjson.loads(r["raw"]), "source": "/producers/forger"} for r in rows])
    for row, event in zip(rows, rewritten, strict=True):
        await conn.execute("UPDATE audit_log SET raw = $1, hash = $2, prevhash = $3, event_id = $4::uuid "
                           "WHERE event_id = $5::uuid", orjson.dumps(event), event["hash"], event["prevhash"],
                           event["id"], row["event_id"])
    await conn.execute("UPDATE stream_heads SET hash = $1 WHERE stream_id = 'extra'", rewritten[-1]["hash"])
    assert run("verify", "chains").returncode == 0  # the chain alone cannot tell: it is consistent
    caught = run("verify", "--checkpoint", str(tmp_path / "cp.txt"), "--json")
    found = orjson.loads(caught.stdout)["findings"]
    assert caught.returncode == 1 and {f["code"] for f in found} == {"audit_differs"}
    assert sorted((f["stream_id"], f["seq"]) for f in found) == [("extra", n) for n in range(1, 10)]


async def test_the_signer_process_signs_what_grew_on_its_interval(ledger: KafkaLedger) -> None:
    await ledger.append(VECTOR_EVENTS)
    await ledger.project()
    assert ledger.run("keys", "init").returncode == 0
    signer = subprocess.Popen([*CLI, "signer", "--interval", "0.5"], env={**os.environ, **ledger.env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def signed(records: int) -> bool | None:
        newest: dict[bytes, int] = {}
        for r in await read_log(ledger.settings, ledger.settings.checkpoints_topic):
            newest[r.key] = max(newest.get(r.key, 0), Checkpoint.parse(r.value.decode()).size)
        return sum(newest.values()) == records or None

    try:
        await poll(lambda: signed(len(VECTOR_EVENTS)), 60, "the signer's first round")
        await ledger.append(rechain("later"))  # signed from Kafka, projected or not
        await poll(lambda: signed(len(VECTOR_EVENTS) + 9), 60, "a round after the log grew")
        assert signer.poll() is None
    finally:
        signer.terminate()
        signer.wait(30)


async def test_a_checkpoint_published_but_not_kept_is_kept_by_the_next_round(ledger: KafkaLedger) -> None:
    from runledger.streams.tools.signer import LogSigner

    await ledger.append(VECTOR_EVENTS)
    await ledger.project()
    assert ledger.run("keys", "init").returncode == 0
    signer = LogSigner(ledger.settings, Signer.from_private_key(ledger.settings.checkpoint_key_path.read_text()))
    await signer.start()
    try:
        done = await signer.round(None)  # signed and published; the signer stops before PostgreSQL keeps them
    finally:
        await signer.stop()
    assert done.signed and await ledger.conn.fetchval("SELECT count(*) FROM checkpoints") == 0
    again = ledger.run("checkpoint", "--json")
    assert again.returncode == 0 and orjson.loads(again.stdout)["signed"] == []  # nothing grew: nothing new
    kept = {r["note"] for r in await ledger.conn.fetch("SELECT note FROM checkpoints")}
    assert kept == {s.note for s in done.signed}
    assert ledger.run("prove", VECTOR_EVENTS[0]["id"]).returncode == 0
