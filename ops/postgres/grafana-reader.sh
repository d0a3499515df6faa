#!/bin/sh
# Run once by the postgres image when its data directory is created (docker-entrypoint-initdb.d): the login
# Grafana's PostgreSQL datasource uses, a member of runledger_reader (migration 009: SELECT only), read-only by
# default too, finding the tables in the runledger schema.
set -eu
psql -v ON_ERROR_STOP=1 -v password="$GRAFANA_DB_PASSWORD" --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
DO $$ BEGIN CREATE ROLE runledger_reader NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
CREATE ROLE grafana LOGIN PASSWORD :'password' IN ROLE runledger_reader;
ALTER ROLE grafana SET search_path = runledger;
ALTER ROLE grafana SET default_transaction_read_only = on;
SQL
