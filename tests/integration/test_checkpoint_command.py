"""`runledger keys init` and `runledger checkpoint`: a signed tree head, kept and published, that an auditor
checks with the verifier key alone."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import asyncpg
import orjson

from runledger.projections.postgres.db import connect, migrate
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.pricing import load_tokencost_catalog
from runledger.projections.records import LogRecord
from runledger.schemas.checkpoint import Verifier
from runledger.schemas.merkle import leaf_hash, root_of
from runledger.streams.settings import Settings
from tests.conftest import CLI, VECTOR_EVENTS
from tests.integration.conftest import read_log


async def test_a_checkpoint_is_signed_kept_and_published(settings: Settings, env: dict[str, str],
                                                         tmp_path: Path) -> None:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    await migrate(settings.database_url, schema)
    pool = await connect(settings.database_url, schema)
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": schema})
    try:
        store = ProjectionStore(pool, load_tokencost_catalog(), "test-group")
        await store.apply_batch([LogRecord("t.events", 0, i, e["subject"].encode(), orjson.dumps(e))
                                 for i, e in enumerate(VECTOR_EVENTS)])
        key = tmp_path / "keys" / "checkpoint.key"
        run_env = {**os.environ, **env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CHECKPOINT_KEY": str(key),
                   "RUNLEDGER_CHECKPOINT_ORIGIN": "runledger.test/log"}

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*CLI, *args], env=run_env, capture_output=True, text=True, timeout=120)

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
    finally:
        await pool.close()
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()
