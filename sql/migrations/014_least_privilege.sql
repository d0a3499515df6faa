-- Each component's login sees what it needs (README "Roles and secrets"): the logins themselves, their passwords
-- and what no schema can grant (the database, the advisory lock functions) are sql/roles.sql's, which
-- `runledger db roles` runs as a superuser.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'runledger_producer') THEN
        CREATE ROLE runledger_producer NOLOGIN;
    END IF;
END $$;
DO $$
DECLARE
    s text := current_schema();
BEGIN
    -- The dashboards' reader (Grafana's login is a member): the columns the panels read (the panel_* queries of
    -- queries.sql, projections/postgres/panels.py) and nothing else, now or in a table added later; no payload
    -- (audit_log.raw, dead_letters.value, parked_events.value) and no input or output of a step.
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I REVOKE SELECT ON TABLES FROM runledger_reader', s);
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM runledger_reader', s);
    EXECUTE format('GRANT SELECT (stream_id, workflow, status, started_at, duration_ms, cost_usd, budget_usd) '
                   'ON %I.executions TO runledger_reader', s);
    EXECUTE format('GRANT SELECT (stream_id, model, provider, cost_usd, cost_source, occurred_at) '
                   'ON %I.costs TO runledger_reader', s);
    EXECUTE format('GRANT SELECT (check_name, finished_at, events, findings) ON %I.verifications '
                   'TO runledger_reader', s);
    EXECUTE format('GRANT SELECT (id, signed_at, size, origin, key_name) ON %I.checkpoints TO runledger_reader', s);

    -- A producer's `runledger wait` (the event_status, problems and live_workers queries): where an event is,
    -- never what it holds.
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO runledger_producer', s);
    EXECUTE format('GRANT SELECT (stream_id, seq, event_id, hash) ON %I.audit_log TO runledger_producer', s);
    EXECUTE format('GRANT SELECT (id, stream_id, seq, event_id, reason, error, status) ON %I.dead_letters '
                   'TO runledger_producer', s);
    EXECUTE format('GRANT SELECT (stream_id, seq, event_id) ON %I.parked_events TO runledger_producer', s);
    EXECUTE format('GRANT SELECT (stream_id, seq, hash) ON %I.stream_heads TO runledger_producer', s);
    EXECUTE format('GRANT SELECT ON %I.log_problems TO runledger_producer', s);
    EXECUTE format('GRANT SELECT (worker_id, group_id, host, pid, started_at, seen_at, partitions) '
                   'ON %I.workers TO runledger_producer', s);

    -- The worker reads which migrations were applied (it applies none): the record of them is the owner's.
    EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON %I.schema_migrations FROM runledger_worker', s);
END $$;
