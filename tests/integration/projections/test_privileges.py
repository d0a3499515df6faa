"""Least privilege on the real PostgreSQL, with the roles `runledger dev up` created through `runledger db roles`'s
code (sql/roles.sql, as compose.yaml's roles service runs it) and a schema the owner's login migrated: each
component's login can do its work and nothing more."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest

from runledger.projections.postgres.db import migrate
from runledger.projections.postgres.panels import COST, EXECUTIONS, INTEGRITY, panel_rows
from runledger.projections.postgres.queries import query
from runledger.projections.postgres.roles import create_roles
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.postgres.wait import wait_projected
from runledger.projections.pricing import load_tokencost_catalog
from runledger.projections.records import LogRecord
from runledger.streams.settings import DATABASE_ROLES, Settings
from runledger.streams.worker.app import SchemaNotMigrated, check_schema, worker_pool
from tests.conftest import VECTOR_EVENTS

OTHER_ROLES = ("postgres", "runledger_owner", "runledger_worker", "runledger_producer", "runledger_reader",
               "grafana")
APPLY_LOCK = "SELECT pg_advisory_lock(hashtext('runledger.apply:' || $1::text))"  # the key every worker shares


def owner_settings(settings: Settings, schema: str) -> Settings:
    """The settings with the owner's login, as compose.yaml has them (the tests' own URL names the superuser)."""
    url = urlsplit(settings.database_url)
    owner_url = urlunsplit(url._replace(netloc=f"{DATABASE_ROLES['owner']}@{url.hostname}:{url.port}"))
    return settings.model_copy(update={"database_url": owner_url, "db_schema": schema})


@pytest.fixture
async def owned(settings: Settings) -> AsyncIterator[Settings]:
    """A schema migrated by the owner's login, with the vectors projected by the worker's and one dead letter."""
    schema = f"p_{uuid.uuid4().hex[:12]}"
    owner = owner_settings(settings, schema)
    await migrate(owner.database_dsn(), schema)
    pool = await worker_pool(owner)
    try:
        values = [orjson.dumps(e) for e in VECTOR_EVENTS] + [b"not json"]
        await ProjectionStore(pool, load_tokencost_catalog(), "g").apply_batch(
            [LogRecord("t.events", 0, i, b"k", v) for i, v in enumerate(values)])
    finally:
        await pool.close()
    yield owner
    admin = await asyncpg.connect(settings.database_url)
    try:
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await admin.close()


async def login(settings: Settings, which: str) -> asyncpg.Connection:
    return await asyncpg.connect(settings.database_dsn(which),  # type: ignore[arg-type]
                                 server_settings={"search_path": settings.db_schema})


async def refused(conn: asyncpg.Connection, statement: str, *args: object) -> None:
    with pytest.raises((asyncpg.InsufficientPrivilegeError, asyncpg.ReadOnlySQLTransactionError)):
        await conn.execute(statement, *args)


async def test_the_owner_migrates_without_being_a_superuser(owned: Settings) -> None:
    conn = await login(owned, "owner")
    try:
        assert await conn.fetchval("SELECT session_user") == "runledger_owner"
        assert tuple(await conn.fetchrow("SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls FROM pg_roles "
                                         "WHERE rolname = session_user")) == (False, False, False, False)
        owners = {r[0] for r in await conn.fetch("SELECT tableowner FROM pg_tables WHERE schemaname = $1",
                                                 owned.db_schema)}
        assert owners == {"runledger_owner"}
        for role in ("postgres", "runledger_worker"):
            await refused(conn, f"SET ROLE {role}")
    finally:
        await conn.close()


async def test_the_worker_logs_in_as_itself_and_cannot_become_another_role(owned: Settings) -> None:
    pool = await worker_pool(owned)  # the worker's own path to PostgreSQL
    try:
        async with pool.acquire() as conn:
            assert tuple(await conn.fetchrow("SELECT session_user, current_user")) == ("runledger_worker",) * 2
            for role in OTHER_ROLES:
                if role != "runledger_worker":
                    await refused(conn, f"SET ROLE {role}")
            await refused(conn, "SET SESSION AUTHORIZATION postgres")
            await conn.execute("RESET ROLE")
            assert await conn.fetchval("SELECT current_user") == "runledger_worker"
            assert await conn.fetchval("SELECT count(*) FROM pg_auth_members WHERE member = 'runledger_worker'::regrole"
                                       ) == 0
            async with conn.transaction():  # the locks its batches take
                await conn.execute(query("apply_lock"))
                await conn.execute(query("checkpoint_try_lock"))
            await refused(conn, "UPDATE audit_log SET type = 'x'")
            await refused(conn, "INSERT INTO schema_migrations (version, name) VALUES (999, 'x')")
    finally:
        await pool.close()


async def test_a_worker_applies_no_migration_and_refuses_a_schema_that_lacks_one(owned: Settings) -> None:
    await check_schema(owned)  # migrated by the owner: the worker may start
    with pytest.raises(SchemaNotMigrated, match=r"lacks migrations 001_projections, .*`runledger db migrate`"):
        await check_schema(owned.model_copy(update={"db_schema": f"{owned.db_schema}_never"}))


async def test_the_reader_sees_the_panels_and_no_payload_and_cannot_stall_the_workers(owned: Settings) -> None:
    conn = await login(owned, "reader")
    try:
        assert await conn.fetchval("SELECT session_user") == DATABASE_ROLES["reader"]
        end = datetime.now(UTC) + timedelta(days=1)
        for panel in (*EXECUTIONS, *COST, *INTEGRITY):
            await panel_rows(conn, panel, end - timedelta(days=3650), end)  # every panel, as Grafana runs it
        assert await conn.fetchval("SELECT count(*) FROM executions") == 4
        for statement in ("SELECT raw FROM audit_log", "SELECT count(*) FROM audit_log",
                          "SELECT value FROM dead_letters", "SELECT value FROM parked_events",
                          "SELECT * FROM executions", "SELECT * FROM steps", "SELECT * FROM outbox"):
            await refused(conn, statement)
        for statement in (APPLY_LOCK, "SELECT pg_advisory_lock_shared(hashtext('runledger.apply:' || $1::text))",
                          "SELECT pg_try_advisory_lock(hashtext('runledger.apply:' || $1::text))"):
            await refused(conn, statement, owned.db_schema)
        async with conn.transaction(readonly=True):  # read-only transactions do not help either
            await refused(conn, "SELECT pg_advisory_xact_lock(hashtext('runledger.apply:' || $1::text))",
                          owned.db_schema)
        assert await conn.fetchval("SHOW statement_timeout") == "30s"
        assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
        await refused(conn, "INSERT INTO verifications (check_name, seconds, events, findings, codes) "
                      "VALUES ('chains', 0, 0, 0, '{}')")
        for role in OTHER_ROLES:
            if role not in ("grafana", "runledger_reader"):
                await refused(conn, f"SET ROLE {role}")
    finally:
        await conn.close()


async def test_a_producers_wait_sees_where_an_event_is_and_not_what_it_holds(owned: Settings) -> None:
    first = VECTOR_EVENTS[0]
    done = await wait_projected(owned.database_dsn("producer"), owned.db_schema, first["subject"], 1,
                                event_id=first["id"], timeout=10, group_id="g", topic="t.events")
    assert (done.status, done.hash) == ("projected", first["hash"])
    conn = await login(owned, "producer")
    try:
        assert await conn.fetchval("SELECT session_user") == "runledger_producer"
        for statement in ("SELECT raw FROM audit_log", "SELECT value FROM dead_letters", "SELECT * FROM executions",
                          "DELETE FROM stream_heads", "SET ROLE runledger_worker"):
            await refused(conn, statement)
        await refused(conn, APPLY_LOCK, owned.db_schema)
    finally:
        await conn.close()


@pytest.mark.parametrize("which", ["owner", "worker", "producer", "reader"])
async def test_every_login_needs_its_password(owned: Settings, which: str) -> None:
    url = urlsplit(owned.database_dsn(which))  # type: ignore[arg-type]
    wrong = urlunsplit(url._replace(netloc=f"{url.username}:not-the-password@{url.hostname}:{url.port}"))
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(wrong)


async def test_db_roles_hands_a_schema_a_superuser_made_to_the_owner(settings: Settings) -> None:
    """A deployment, or an embedded stack, migrated before the roles: its schema is the superuser's."""
    schema = f"u_{uuid.uuid4().hex[:12]}"
    await migrate(settings.database_url, schema)  # as the superuser, as every migration ran before
    admin, passwords = settings.database_dsn("admin"), settings.role_passwords()
    try:
        await create_roles(admin, schema, passwords)
        conn = await login(owner_settings(settings, schema), "owner")
        try:
            owners = await conn.fetch(
                "SELECT tableowner FROM pg_tables WHERE schemaname = $1 UNION "
                "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = $1 UNION "
                "SELECT pg_get_userbyid(proowner) FROM pg_proc WHERE pronamespace = $1::regnamespace", schema)
            assert {r[0] for r in owners} == {"runledger_owner"}
            async with conn.transaction():  # what a later migration does, now the owner's
                await conn.execute("ALTER TABLE executions ADD COLUMN later integer")
                await conn.execute("GRANT SELECT (later) ON executions TO runledger_reader")
                await conn.execute("SELECT setval(pg_get_serial_sequence('dead_letters', 'id'), 1)")
        finally:
            await conn.close()
    finally:
        await create_roles(admin, settings.db_schema, passwords)  # the reader's search path as the stack had it
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await conn.close()
