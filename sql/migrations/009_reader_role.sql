-- The role dashboards and reports read with (Grafana's datasource user is a member): SELECT on every table,
-- now and later, and nothing else: a dashboard editor must not be able to rewrite the record.
-- (Migration 014 narrows this to the columns the panels read.)
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'runledger_reader') THEN
        CREATE ROLE runledger_reader NOLOGIN;
    END IF;
END $$;
DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO runledger_reader', current_schema());
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO runledger_reader', current_schema());
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT SELECT ON TABLES TO runledger_reader',
                   current_schema());
END $$;
