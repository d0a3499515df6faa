-- runledger's LOGIN roles, created or brought up to date (their passwords included) by `runledger db roles` as a
-- superuser: compose.yaml's roles service and the embedded stack (`runledger dev up`) run this same file. The
-- passwords and the schema come as settings of the transaction: runledger.password.<role> and runledger.schema.
--
--   runledger_owner     owns the schemas: the migrations, and the operator's commands
--   runledger_worker    the workers: what migration 001 and later grant it, never UPDATE or DELETE of audit_log
--   runledger_producer  a producer's `runledger wait`: where an event is, read-only (migration 014)
--   runledger_api       `runledger serve`: reads the projection, the proofs and the sources, writes nothing
--                       (migration 016)
--   grafana             the dashboards: a member of runledger_reader, the panels' columns only (migration 014)
--
-- None is a superuser or a member of another role (grafana: of runledger_reader alone), so a session cannot SET
-- ROLE its way to more. The advisory lock functions, which PostgreSQL lets PUBLIC call (also in a read-only
-- transaction), are the owner's and the workers' only: a reader holding the apply lock's key would stall every
-- worker.
DO $$
DECLARE
    login text;
    member_of record;
    fn regprocedure;
    schema text := current_setting('runledger.schema');
    owned record;
BEGIN
    FOREACH login IN ARRAY ARRAY['runledger_reader', 'runledger_owner', 'runledger_worker', 'runledger_producer',
                                 'runledger_api', 'grafana'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = login) THEN
            EXECUTE format('CREATE ROLE %I', login);
        END IF;
        IF login = 'runledger_reader' THEN
            EXECUTE 'ALTER ROLE runledger_reader NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION '
                    'NOBYPASSRLS';
            CONTINUE;
        END IF;
        EXECUTE format('ALTER ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS '
                       'PASSWORD %L', login, current_setting('runledger.password.' || login));
        FOR member_of IN SELECT m.roleid::regrole AS role, m.grantor::regrole AS grantor FROM pg_auth_members m
                         WHERE m.member = login::regrole LOOP
            EXECUTE format('REVOKE %s FROM %I GRANTED BY %s', member_of.role, login, member_of.grantor);
        END LOOP;
    END LOOP;
    GRANT runledger_reader TO grafana;

    -- Only runledger's logins connect to its database; only the owner creates schemas in it.
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO runledger_worker, runledger_producer, '
                   'runledger_api, grafana',
                   current_database());
    EXECUTE format('GRANT CONNECT, CREATE, TEMPORARY ON DATABASE %I TO runledger_owner', current_database());

    FOR fn IN SELECT p.oid FROM pg_proc p WHERE p.pronamespace = 'pg_catalog'::regnamespace
                                            AND p.proname LIKE 'pg\_%advisory\_%' LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', fn);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO runledger_owner, runledger_worker', fn);
    END LOOP;

    -- Bounded, read-only sessions for the readers; the reader finds the panels' tables by name.
    ALTER ROLE grafana SET default_transaction_read_only = on;
    ALTER ROLE grafana SET statement_timeout = '30s';
    ALTER ROLE grafana SET lock_timeout = '5s';
    ALTER ROLE grafana SET idle_in_transaction_session_timeout = '60s';
    EXECUTE format('ALTER ROLE grafana SET search_path = %I', schema);
    ALTER ROLE runledger_producer SET default_transaction_read_only = on;
    ALTER ROLE runledger_producer SET statement_timeout = '30s';
    ALTER ROLE runledger_api SET default_transaction_read_only = on;
    ALTER ROLE runledger_api SET statement_timeout = '30s';
    ALTER ROLE runledger_api SET lock_timeout = '5s';
    ALTER ROLE runledger_api SET idle_in_transaction_session_timeout = '60s';

    -- A schema made before these roles, by a superuser (the migrations ran as one): handed to the owner with
    -- everything in it, so that the owner's login migrates it from now on.
    IF EXISTS (SELECT FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner
               WHERE n.nspname = schema AND r.rolsuper) THEN
        EXECUTE format('ALTER SCHEMA %I OWNER TO runledger_owner', schema);
        FOR owned IN SELECT c.oid::regclass AS name, c.relkind FROM pg_class c
                     WHERE c.relnamespace = schema::regnamespace AND c.relkind IN ('r', 'p', 'S', 'v', 'm')
                       AND NOT EXISTS (SELECT FROM pg_depend d  -- a column's sequence follows its table
                                       WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                         AND d.deptype IN ('a', 'i')) LOOP
            EXECUTE format('ALTER %s %s OWNER TO runledger_owner',
                           CASE owned.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                                              WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END, owned.name);
        END LOOP;
        FOR owned IN SELECT p.oid::regprocedure AS name FROM pg_proc p WHERE p.pronamespace = schema::regnamespace LOOP
            EXECUTE format('ALTER FUNCTION %s OWNER TO runledger_owner', owned.name);
        END LOOP;
    END IF;
END $$;
