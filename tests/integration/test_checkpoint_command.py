"""`runledger keys init` and `runledger checkpoint`: a signed tree head, kept and published, that an auditor
checks with the verifier key alone."""

from __future__ import annotations

import base64
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from runledger.projections.postgres.db import connect, migrate
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.pricing import load_tokencost_catalog
from runledger.projections.records import LogRecord
from runledger.schemas.checkpoint import Signer, Verifier
from runledger.schemas.merkle import TreeState, leaf_hash, root_of
from runledger.streams.settings import Settings
from tests.conftest import CLI, VECTOR_EVENTS
from tests.integration.conftest import read_log, rechain


@dataclass
class Ledger:
    """A migrated schema of its own, a store acting as the worker, the owner's connection, and the command
    line run on that schema with a checkpoint key of its own."""

    store: ProjectionStore
    conn: asyncpg.Connection
    run_env: dict[str, str]

    async def project(self, events: list[dict[str, Any]], start: int = 0) -> None:
        await self.store.apply_batch([LogRecord("t.events", 0, start + i, e["subject"].encode(), orjson.dumps(e))
                                      for i, e in enumerate(events)])

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], env=self.run_env, capture_output=True, text=True, timeout=120)


@pytest.fixture
async def ledger(settings: Settings, env: dict[str, str], tmp_path: Path) -> AsyncIterator[Ledger]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    await migrate(settings.database_url, schema)
    pool = await connect(settings.database_url, schema)
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": schema})
    run_env = {**os.environ, **env, "RUNLEDGER_DB_SCHEMA": schema,
               "RUNLEDGER_CHECKPOINT_KEY": str(tmp_path / "keys" / "checkpoint.key"),
               "RUNLEDGER_CHECKPOINT_ORIGIN": "runledger.test/log"}
    try:
        yield Ledger(ProjectionStore(pool, load_tokencost_catalog(), "test-group"), conn, run_env)
    finally:
        await pool.close()
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


async def test_a_checkpoint_is_signed_kept_and_published(settings: Settings, ledger: Ledger,
                                                         tmp_path: Path) -> None:
    await ledger.project(VECTOR_EVENTS)
    run, conn = ledger.run, ledger.conn
    key = tmp_path / "keys" / "checkpoint.key"
    missing = run("checkpoint")
    assert missing.returncode == 2 and "runledger keys init" in missing.stderr
    assert run("keys", "init").returncode == 0
    assert key.stat().st_mode & 0o777 == 0o600
    assert run("keys", "init").returncode == 2  # never replaced by accident
    verifier_key = Path(f"{key}.pub").read_text().strip()
    assert run("keys", "show").stdout.strip() == verifier_key
    signed = run("checkpoint", "--json", "--out", str(tmp_path / "cp.txt"))
    assert signed.returncode == 0, signed.stderr
    report = orjson.loads(signed.stdout)
    note = (tmp_path / "cp.txt").read_text()
    checkpoint = Verifier(verifier_key).open(note, origin="runledger.test/log")  # the public key alone
    hashes = [r[0] for r in await conn.fetch("SELECT hash FROM audit_log ORDER BY tlog_index")]
    assert (checkpoint.size, checkpoint.root) == (18, root_of([leaf_hash(bytes.fromhex(h)) for h in hashes]))
    assert report["note"] == note and report["size"] == 18
    assert await conn.fetchval("SELECT note FROM checkpoints WHERE id = $1", report["id"]) == note
    published = await read_log(settings, settings.checkpoints_topic)
    assert [r.value.decode() for r in published if r.value is not None] == [note]

    # More events, a second checkpoint; proofs made from the database, checked offline.
    await ledger.project(rechain("extra"), start=100)
    assert run("checkpoint", "--out", str(tmp_path / "cp2.txt")).returncode == 0
    event_id = VECTOR_EVENTS[4]["id"]
    assert run("prove", event_id, "--out", str(tmp_path / "inc.json")).returncode == 0
    ok = run("verify-proof", str(tmp_path / "inc.json"), "--key", verifier_key)
    assert ok.returncode == 0 and f"event {event_id} is leaf" in ok.stdout and "at size 27" in ok.stdout
    assert run("prove-consistency", str(tmp_path / "cp.txt"), "--out", str(tmp_path / "con.json")).returncode == 0
    ok = run("verify-proof", str(tmp_path / "con.json"), "--json")  # the key from beside the signer key
    assert ok.returncode == 0 and orjson.loads(ok.stdout)["old_size"] == 18

    def tampered(name: str, change: Callable[[dict[str, Any]], None]) -> subprocess.CompletedProcess[str]:
        document = orjson.loads((tmp_path / name).read_bytes())
        change(document)
        (tmp_path / "bad.json").write_bytes(orjson.dumps(document))
        return run("verify-proof", str(tmp_path / "bad.json"), "--key", verifier_key)

    def flip(document: dict[str, Any]) -> None:
        first = base64.b64decode(document["proof"][0])
        document["proof"][0] = base64.b64encode(bytes([first[0] ^ 1]) + first[1:]).decode()

    def other_event(document: dict[str, Any]) -> None:
        document["event"] = base64.b64encode(orjson.dumps(VECTOR_EVENTS[5])).decode()

    for name, change in (("inc.json", flip), ("inc.json", other_event), ("con.json", flip)):
        bad = tampered(name, change)
        assert bad.returncode == 1 and "NOT PROVEN" in bad.stdout, (name, bad.stdout)
    other_key = Signer.generate("runledger.test/log").verifier_key
    refused = run("verify-proof", str(tmp_path / "inc.json"), "--key", other_key)
    assert refused.returncode == 1 and "no signature" in refused.stdout

    # A superuser rewrites one event and the whole tree after it, consistently: the proof from the
    # checkpoint kept before can no longer be made to verify.
    await conn.execute("SET session_replication_role = replica")
    leaves = [leaf_hash(bytes.fromhex(h[0])) for h in await conn.fetch(
        "SELECT hash FROM audit_log ORDER BY tlog_index")]
    leaves[3] = leaf_hash(b"rewritten")
    state = TreeState()
    nodes = [node for leaf in leaves for node in state.append(leaf)]
    await conn.execute("DELETE FROM tlog_nodes")
    await conn.copy_records_to_table("tlog_nodes", records=nodes, columns=("level", "index", "hash"))
    await conn.execute("UPDATE tlog_state SET size = $1, peaks = $2", state.size, state.peaks)
    assert run("checkpoint", "--out", str(tmp_path / "cp3.txt")).returncode == 0
    assert run("prove-consistency", str(tmp_path / "cp.txt"), str(tmp_path / "cp3.txt"), "--out",
               str(tmp_path / "con3.json")).returncode == 0
    rewritten = run("verify-proof", str(tmp_path / "con3.json"), "--key", verifier_key)
    assert rewritten.returncode == 1 and "old root" in rewritten.stdout


async def test_verify_against_a_checkpoint_catches_a_rewritten_stream_and_a_deleted_one(
        ledger: Ledger, tmp_path: Path) -> None:
    await ledger.project([*VECTOR_EVENTS, *rechain("extra")])
    run, conn = ledger.run, ledger.conn
    assert run("keys", "init").returncode == 0
    assert run("checkpoint", "--out", str(tmp_path / "cp.txt")).returncode == 0
    intact = run("verify", "--checkpoint", str(tmp_path / "cp.txt"))
    assert intact.returncode == 0 and "27 events checked" in intact.stdout, intact.stdout + intact.stderr
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
    chains = run("verify", "chains")
    assert chains.returncode == 0  # the chain alone cannot tell: it is consistent
    caught = run("verify", "--checkpoint", str(tmp_path / "cp.txt"), "--json")
    report = orjson.loads(caught.stdout)
    assert caught.returncode == 1 and [f["code"] for f in report["findings"]] == ["leaf_changed", "root_mismatch"]
    assert (report["findings"][0]["stream_id"], report["findings"][0]["seq"]) == ("extra", 1)

    # A whole stream deleted, its head with it.
    await conn.execute("DELETE FROM audit_log WHERE stream_id = $1", VECTOR_EVENTS[0]["subject"])
    await conn.execute("DELETE FROM stream_heads WHERE stream_id = $1", VECTOR_EVENTS[0]["subject"])
    caught = run("verify", "--checkpoint", str(tmp_path / "cp.txt"))
    assert caught.returncode == 1 and "leaf_missing" in caught.stdout
