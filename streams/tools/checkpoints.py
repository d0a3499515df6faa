"""``runledger keys``, ``checkpoint``, ``signer``, ``prove`` and ``prove-consistency``: the signer key, signer rounds
(``runledger.streams.tools.signer``), and proofs from the trees PostgreSQL keeps."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import asyncpg

from runledger.projections.postgres.db import StoreUnavailable, connect, connect_one
from runledger.projections.postgres.queries import query
from runledger.projections.postgres.reads import inclusion_proof
from runledger.projections.postgres.trees import StoredTree, range_roots, stored_trees
from runledger.schemas.checkpoint import Checkpoint, CheckpointError, Signer
from runledger.schemas.errors import PermanentError, TransientError
from runledger.schemas.logtrees import partition_of
from runledger.schemas.merkle import consistency_ranges
from runledger.schemas.proofs import consistency_document
from runledger.streams.settings import Settings
from runledger.streams.tools.signer import LogSigner, Round

__all__ = ["SignerKeyExposed", "checkpoint_signer", "create_signer_key", "prove_consistency", "prove_inclusion",
           "run_signer", "sign_if_due", "sign_round", "verifier_key"]

log = logging.getLogger(__name__)


def verifier_key(settings: Settings, key: str | None) -> str:
    """The verifier key ``key`` names: the key itself, or a file holding it; by default the ``.pub`` file
    beside the signer key."""
    key = key or f"{settings.checkpoint_key_path}.pub"
    return Path(key).read_text().strip() if Path(key).is_file() else key


class SignerKeyExposed(PermanentError):
    """The signer key's file is open to users other than its owner, any of whom could sign checkpoints in the
    log's name: ``chmod 600`` it, and if someone else may have read it, make a new key (``runledger keys init
    --force``) and hand auditors its verifier key."""

    code = "signer_key_exposed"


def checkpoint_signer(settings: Settings) -> Signer | None:
    """The signer key in ``RUNLEDGER_CHECKPOINT_KEY``, or None if there is none (`runledger keys init`). Raises
    SignerKeyExposed, and uses nothing, if its file's mode lets group or others in."""
    path = settings.checkpoint_key_path
    try:
        with open(path) as key:
            mode = os.fstat(key.fileno()).st_mode & 0o777  # of the file read, not of a name it was swapped for
            if mode & 0o077:
                raise SignerKeyExposed(f"refusing the signer key {path}: its mode {mode:04o} lets group or others "
                                       f"read it. `chmod 600 {path}` (and `runledger keys init --force` if "
                                       "another may have read it)")
            return Signer.from_private_key(key.read())
    except FileNotFoundError:
        return None


def create_signer_key(settings: Settings) -> Signer:
    """A new signer key, written to ``RUNLEDGER_CHECKPOINT_KEY`` (mode 0600, replacing what is there) with its
    verifier key beside it as ``<key>.pub``."""
    signer = Signer.generate(settings.checkpoint_origin)
    path = settings.checkpoint_key_path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that was there keeps its mode through O_CREAT: a secret is never left readable
    with os.fdopen(fd, "w") as out:
        out.write(signer.private_key + "\n")
    path.with_name(path.name + ".pub").write_text(signer.verifier_key + "\n")
    return signer


async def sign_round(settings: Settings, signer: Signer) -> Round:
    """``runledger checkpoint``: one signer round now (``runledger.streams.tools.signer``), under the lock that
    keeps two signers of one schema from racing."""
    conn = await connect_one(settings.database_dsn(), settings.db_schema)
    log_signer = LogSigner(settings, signer)
    try:
        await log_signer.start()
        async with conn.transaction():
            await conn.execute(query("checkpoint_lock"))
            return await log_signer.round(conn)
    finally:
        await log_signer.stop()
        await conn.close()


async def sign_if_due(log_signer: LogSigner, pool: asyncpg.Pool, interval_s: float) -> Round | None:
    """What a worker does on its checkpoint timer: a round of its (started) signer, unless another worker or
    signer is in one or one was signed within ``interval_s``."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(query("round_idle_bound"))
        if not await conn.fetchval(query("checkpoint_try_lock")):
            return None
        if not await conn.fetchval(query("checkpoint_due"), interval_s):
            return None
        return await log_signer.round(conn)


async def run_signer(settings: Settings, signer: Signer, interval_s: float) -> None:
    """``runledger signer``: a round every ``interval_s`` seconds, until cancelled; a failed round is logged and
    tried again at the next interval."""
    pool = await connect(settings.database_dsn(), settings.db_schema, max_size=1)
    log_signer = LogSigner(settings, signer)
    try:
        await log_signer.start()
        while True:
            started = time.monotonic()
            try:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute(query("checkpoint_lock"))
                    done = await log_signer.round(conn)
                for s in done.signed:
                    log.info("signed %s at size %d", s.checkpoint.origin, s.checkpoint.size)
            except (TransientError, StoreUnavailable, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
                log.warning("signer round failed: %s; trying again in %.0f s", e, interval_s)
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))
    finally:
        await log_signer.stop()
        await pool.close()


async def _open_tree(conn: asyncpg.Connection, settings: Settings, origin: str) -> StoredTree:
    """The stored tree a checkpoint origin names."""
    try:
        topic, partition = partition_of(origin, settings.checkpoint_origin)
    except CheckpointError as e:
        raise PermanentError(str(e)) from None
    tree = (await stored_trees(conn, topic)).get(partition)
    if tree is None:
        raise PermanentError(f"no tree of {topic} partition {partition} is stored in schema {settings.db_schema}")
    return tree


async def prove_inclusion(settings: Settings, event_id: str) -> dict[str, Any]:
    """The event's inclusion proof in its partition's tree, under the newest checkpoint of that partition that
    covers it (``runledger.projections.postgres.reads.inclusion_proof``, which the read API serves too)."""
    conn = await connect_one(settings.database_dsn(), settings.db_schema)
    try:
        return (await inclusion_proof(conn, settings.checkpoint_origin, event_id)).document
    finally:
        await conn.close()


async def prove_consistency(settings: Settings, old: str, new: str | None) -> dict[str, Any]:
    """A consistency proof from checkpoint note ``old`` to ``new`` (default: the newest kept of its origin)."""
    conn = await connect_one(settings.database_dsn(), settings.db_schema)
    try:
        origin = Checkpoint.parse(old).origin
        if new is None:
            new = await conn.fetchval(query("covering_checkpoint"), -1, origin)
            if new is None:
                raise PermanentError(f"no checkpoint of {origin} is kept yet: sign one with `runledger checkpoint`")
        if Checkpoint.parse(new).origin != origin:
            raise PermanentError(f"the checkpoints are of two logs: {origin} and {Checkpoint.parse(new).origin}")
        sizes = [Checkpoint.parse(note).size for note in (old, new)]
        if sizes[0] > sizes[1]:
            raise PermanentError(f"the old checkpoint ({sizes[0]}) is larger than the new one ({sizes[1]})")
        tree = await _open_tree(conn, settings, origin)
        proof = await range_roots(conn, tree.id, consistency_ranges(sizes[0], sizes[1]))
    finally:
        await conn.close()
    return consistency_document(old, new, proof)
