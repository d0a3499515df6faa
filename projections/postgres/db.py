"""PostgreSQL connections, migrations, and what a database failure means.

Every driver or network error is translated here into one of runledger's
error classes: the database is unavailable or busy (transient: try again
later), or it refuses this data (``RejectedByDatabase``, permanent: the record
that caused it is dead-lettered alone, see ``runledger.projections.postgres.store``).

A lock that another transaction holds past ``lock_timeout`` is ``StoreLockTimeout``: the database answers, the
work is only to be tried again in place. ``connect`` takes the session settings that bound how long a
connection waits for a lock and how long a client that stopped (frozen, partitioned, dead) keeps its own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from urllib.parse import unquote, urlsplit

import asyncpg
import orjson

from runledger.projections.postgres.queries import migrations, quote_schema
from runledger.projections.records import pg_text
from runledger.schemas.errors import PermanentError, RunledgerError, TransientError

__all__ = ["NOTIFY_CHANNEL", "LockWaits", "RejectedByDatabase", "StoreConflict", "StoreLockTimeout", "StoreTimeout",
           "StoreUnavailable", "cannot_connect", "connect", "connect_one", "database_error", "migrate",
           "pending_migrations"]

NOTIFY_CHANNEL = "runledger_projected"


class StoreUnavailable(TransientError):
    """PostgreSQL is unreachable, went away mid-transaction, or cannot serve now. Retry."""

    code = "database_unavailable"


class StoreConflict(StoreUnavailable):
    """The transaction lost a deadlock, a serialization check or a unique-key race against another one. Retry."""

    code = "database_conflict"


class StoreTimeout(StoreUnavailable):
    """PostgreSQL did not answer in time. Retry."""

    code = "database_timeout"


class StoreLockTimeout(StoreUnavailable):
    """Another transaction held a lock this one needs past ``lock_timeout`` (RUNLEDGER_DB_LOCK_TIMEOUT_S; SQLSTATE
    55P03), and this one rolled back, releasing its own. PostgreSQL is up: a worker tries the batch again in place,
    never sends it to the retry topics (its copies would wait for the same lock). If it lasts, find the holder
    (``SELECT pid, state, xact_start, query FROM pg_stat_activity WHERE pid = ANY(pg_blocking_pids(<waiter>))``):
    a process frozen mid-transaction is ended by PostgreSQL after RUNLEDGER_DB_IDLE_IN_TRANSACTION_TIMEOUT_S.

    ``waited_s``: how long the attempt waited in the statements that take its locks (``LockWaits``)."""

    code = "database_lock_timeout"

    def __init__(self, message: str, waited_s: float = 0.0) -> None:
        super().__init__(message)
        self.waited_s = waited_s


class LockWaits:
    """Seconds spent in the statements that take a batch's locks: the wait for the locks, and a round trip each.
    A statement that gave up waiting (``StoreLockTimeout``) counts too."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started


class RejectedByDatabase(PermanentError):
    """PostgreSQL refuses to store this data (SQLSTATE classes 22, 23 and others not known to be transient).

    The record is dead-lettered alone with the database's message; the rest of its batch is projected.
    """

    code = "rejected_by_database"


# SQLSTATE classes that say something about the server or the schema, not about the data: connection (08),
# transaction state (25, 26), authorization (28), missing database or schema (3D, 3F), rollback (40),
# privileges and missing objects (42: an operator's mistake must not dead-letter every record), resources (53),
# object state and locks (55; 55P03, a lock timeout, is StoreLockTimeout), operator intervention (57), system (58),
# configuration (F0), feature (0A: a cached plan gone stale after a migration).
_TRANSIENT_CLASSES = frozenset({"08", "25", "26", "28", "3D", "3F", "40", "42", "53", "55", "57", "58", "F0", "0A"})
_CONFLICTS = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError, asyncpg.UniqueViolationError)
_NETWORK = (ConnectionError, OSError, TimeoutError, asyncpg.InterfaceError)


def database_error(e: BaseException, what: str) -> RunledgerError | None:
    """The runledger error for a driver, server or network failure, or None if ``e`` is none of those."""
    if isinstance(e, RunledgerError):
        return e
    if isinstance(e, _CONFLICTS):
        return StoreConflict(f"{what}: {e}")
    if isinstance(e, asyncpg.LockNotAvailableError):
        return StoreLockTimeout(f"{what}: {e}")
    if isinstance(e, TimeoutError | asyncpg.QueryCanceledError):
        return StoreTimeout(f"{what}: timed out ({e or type(e).__name__})")
    if isinstance(e, asyncpg.DataError):  # refused while encoding a parameter (an integer out of range, say)
        return RejectedByDatabase(pg_text(f"{e}"))
    if isinstance(e, asyncpg.PostgresError):
        sqlstate = e.sqlstate or ""
        if sqlstate[:2] in _TRANSIENT_CLASSES:
            return StoreUnavailable(f"{what}: {sqlstate} {e}")
        return RejectedByDatabase(pg_text(f"SQLSTATE {sqlstate}: {e}"))
    if isinstance(e, _NETWORK):
        return StoreUnavailable(f"{what}: {e or type(e).__name__}")
    return None


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Binary jsonb (a version byte, then the text) so that COPY can carry it too.
    await conn.set_type_codec("jsonb", schema="pg_catalog", format="binary",
                              encoder=lambda v: b"\x01" + orjson.dumps(v), decoder=lambda b: orjson.loads(b[1:]))


def cannot_connect(database_url: str, e: BaseException, what: str = "connect to") -> StoreUnavailable:
    """The error for a failed connection to ``database_url``: its server and user, never its password (not even
    where the driver's message would repeat it)."""
    parts = urlsplit(database_url)
    message = f"{e or type(e).__name__}"
    if parts.password:
        message = message.replace(unquote(parts.password), "***").replace(parts.password, "***")
    return StoreUnavailable(f"cannot {what} PostgreSQL at {parts.hostname}:{parts.port or 5432} as "
                            f"{unquote(parts.username or '') or 'the default user'}: {message}")


async def _reset_without_locks(conn: asyncpg.Connection) -> None:
    await conn.execute("CLOSE ALL; RESET ALL")


async def connect(database_url: str, schema: str, *, min_size: int = 0, max_size: int = 4,
                  session: Mapping[str, str] | None = None, advisory_locks: bool = True) -> asyncpg.Pool:
    """A pool whose connections use ``schema``, logged in as the URL's user: the worker's own login
    (``Settings.database_dsn("worker")``), with no role it could SET ROLE to, or the owner's for operator work.
    ``session``: more PostgreSQL settings of its sessions, such as ``Settings.db_session``'s bounds.
    ``advisory_locks`` False: a login that may not call the advisory lock functions (``runledger_api``), whose
    connections go back to the pool without asyncpg's ``pg_advisory_unlock_all()``."""
    # Startup parameters, not SET: the pool's RESET ALL on release returns to them.
    server_settings = {**(session or {}), "search_path": quote_schema(schema)}
    try:
        return await asyncpg.create_pool(database_url, min_size=min_size, max_size=max_size, timeout=10,
                                         command_timeout=60, init=_init_connection, server_settings=server_settings,
                                         reset=None if advisory_locks else _reset_without_locks)
    except (*_NETWORK, asyncpg.PostgresError) as e:
        raise cannot_connect(database_url, e) from e


async def connect_one(database_url: str, schema: str, *, decode_jsonb: bool = False) -> asyncpg.Connection:
    """One connection on ``schema`` as the URL's user (the owner, or a producer's login for a wait): for reads,
    waits and admin work. ``decode_jsonb``: jsonb values as Python objects, as the workers' pool has them (else
    as JSON text)."""
    try:
        conn = await asyncpg.connect(database_url, server_settings={"search_path": quote_schema(schema)})
    except (OSError, asyncpg.PostgresError) as e:
        raise cannot_connect(database_url, e) from e
    try:
        if decode_jsonb:
            await _init_connection(conn)
    except BaseException as e:
        await conn.close()
        if isinstance(e, OSError | asyncpg.PostgresError):
            raise cannot_connect(database_url, e, "set up the connection to") from e
        raise
    return conn


async def migrate(database_url: str, schema: str) -> list[str]:
    """Apply the migrations ``schema`` lacks; safe from several processes at once. Returns what ran."""
    try:
        conn = await asyncpg.connect(database_url)
    except (OSError, asyncpg.PostgresError) as e:
        raise cannot_connect(database_url, e) from e
    applied = []
    try:
        quoted = quote_schema(schema)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('runledger.migrate'))")
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
            await conn.execute(f"SET LOCAL search_path TO {quoted}")
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                               "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in migrations():
                if version not in done:
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                                       version, name)
                    applied.append(f"{version:03d}_{name}")
    finally:
        await conn.close()
    return applied


async def pending_migrations(conn: asyncpg.Connection) -> list[str]:
    """The migrations the schema of ``conn``'s search path lacks (all of them if it has none): a worker, which
    applies none, refuses to start on a schema that lacks any."""
    try:
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    except asyncpg.UndefinedTableError:
        done = set()
    return [f"{version:03d}_{name}" for version, name, _ in migrations() if version not in done]
