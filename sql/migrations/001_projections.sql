-- runledger projections, version 1. Applied with search_path set to the target schema, so one
-- database can hold several sets of tables (live, rebuild, one per test).

CREATE TABLE executions (
    stream_id        text PRIMARY KEY,
    workflow         text NOT NULL,
    agent_id         text,
    customer_id      text,
    status           text NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled', 'timeout')),
    started_at       timestamptz NOT NULL,
    ended_at         timestamptz,
    duration_ms      bigint,
    steps_total      integer NOT NULL DEFAULT 0,
    steps_running    integer NOT NULL DEFAULT 0,
    steps_retrying   integer NOT NULL DEFAULT 0,
    steps_completed  integer NOT NULL DEFAULT 0,
    steps_failed     integer NOT NULL DEFAULT 0,
    steps_skipped    integer NOT NULL DEFAULT 0,
    input_tokens     bigint NOT NULL DEFAULT 0,
    output_tokens    bigint NOT NULL DEFAULT 0,
    cached_tokens    bigint NOT NULL DEFAULT 0,
    cost_usd         numeric NOT NULL DEFAULT 0,
    unpriced_costs   integer NOT NULL DEFAULT 0,
    budget_usd       numeric,
    error            jsonb,
    last_seq         bigint NOT NULL,
    last_hash        text NOT NULL,
    updated_at       timestamptz NOT NULL
);
CREATE INDEX executions_workflow ON executions (workflow);
CREATE INDEX executions_status ON executions (status);

CREATE TABLE steps (
    stream_id   text NOT NULL REFERENCES executions (stream_id),
    step_id     text NOT NULL,
    name        text,
    step_order  integer,
    status      text NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed', 'skipped', 'retrying')),
    attempts    integer NOT NULL DEFAULT 0,
    started_at  timestamptz,
    ended_at    timestamptz,
    error       jsonb,
    cost_usd    numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (stream_id, step_id)
);

CREATE TABLE costs (
    event_id         uuid PRIMARY KEY,
    stream_id        text NOT NULL REFERENCES executions (stream_id),
    seq              bigint NOT NULL,
    step_id          text,
    provider         text NOT NULL,
    model            text NOT NULL,
    input_tokens     bigint NOT NULL,
    output_tokens    bigint NOT NULL,
    cached_tokens    bigint,
    cost_usd         numeric,
    cost_source      text NOT NULL CHECK (cost_source IN ('event', 'catalog', 'unpriced')),
    catalog_version  text,
    occurred_at      timestamptz NOT NULL,
    CHECK ((cost_usd IS NULL) = (cost_source = 'unpriced'))
);
CREATE INDEX costs_stream ON costs (stream_id, seq);
CREATE INDEX costs_model ON costs (provider, model);

CREATE TABLE artifacts (
    stream_id     text NOT NULL REFERENCES executions (stream_id),
    artifact_id   text NOT NULL,
    step_id       text,
    type          text NOT NULL,
    name          text NOT NULL,
    uri           text NOT NULL,
    size_bytes    bigint,
    content_type  text,
    created_at    timestamptz NOT NULL,
    seq           bigint NOT NULL,
    PRIMARY KEY (stream_id, artifact_id)
);

-- Every projected event as received. Append-only: see the triggers below.
CREATE TABLE audit_log (
    event_id         uuid PRIMARY KEY,
    stream_id        text NOT NULL,
    seq              bigint NOT NULL,
    type             text NOT NULL,
    source           text NOT NULL,
    specversion      text NOT NULL,
    datacontenttype  text NOT NULL,
    dataschema       text,
    traceparent      text,
    time             timestamptz NOT NULL,
    data             jsonb NOT NULL,
    hash             text NOT NULL,
    raw              bytea NOT NULL,  -- the record value byte for byte: jsonb normalises numbers, the hash needs the original
    prevhash         text NOT NULL,
    kafka_topic      text NOT NULL,
    kafka_partition  integer NOT NULL,
    kafka_offset     bigint NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream_id, seq)
);

CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();

-- The last projected event of each stream: ordering, chain checks, de-duplication.
CREATE TABLE stream_heads (
    stream_id   text PRIMARY KEY,
    seq         bigint NOT NULL,
    hash        text NOT NULL,
    updated_at  timestamptz NOT NULL
);

-- Kafka progress, written in the same transaction as the projections it covers.
CREATE TABLE consumer_offsets (
    group_id     text NOT NULL,
    topic        text NOT NULL,
    partition    integer NOT NULL,
    next_offset  bigint NOT NULL,
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
);

-- Events that arrived before their predecessor: applied, in seq order, once it is projected.
CREATE TABLE parked_events (
    stream_id        text NOT NULL,
    seq              bigint NOT NULL,
    event_id         uuid NOT NULL,
    value            bytea NOT NULL,
    kafka_topic      text NOT NULL,
    kafka_partition  integer NOT NULL,
    kafka_offset     bigint NOT NULL,
    parked_at        timestamptz NOT NULL,
    PRIMARY KEY (stream_id, seq, event_id)
);

-- Permanent failures, kept byte for byte; never dropped.
CREATE TABLE rejected_events (
    id               bigserial PRIMARY KEY,
    reason           text NOT NULL,
    error            text NOT NULL,
    stream_id        text,
    seq              bigint,
    event_id         text,
    kafka_topic      text NOT NULL,
    kafka_partition  integer NOT NULL,
    kafka_offset     bigint NOT NULL,
    kafka_key        bytea,
    value            bytea NOT NULL,
    rejected_at      timestamptz NOT NULL,
    UNIQUE (kafka_topic, kafka_partition, kafka_offset)
);
CREATE INDEX rejected_events_reason ON rejected_events (reason);

-- Model prices, one set per catalog version; the newest version prices new costs.
CREATE TABLE price_catalogs (
    version    text PRIMARY KEY,
    source     text NOT NULL,
    models     integer NOT NULL,
    loaded_at  timestamptz NOT NULL
);
CREATE TABLE model_prices (
    version                 text NOT NULL REFERENCES price_catalogs (version),
    model                   text NOT NULL,
    provider                text,
    input_usd_per_token     numeric NOT NULL,
    output_usd_per_token    numeric NOT NULL,
    cached_usd_per_token    numeric,
    PRIMARY KEY (version, model)
);

-- The role workers use: everything they need, and no way to rewrite the audit log.
-- Created here only where `runledger db roles` (sql/roles.sql) has not made it a login yet: an owner without
-- CREATEROLE is refused a CREATE ROLE even of a role that exists.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'runledger_worker') THEN
        CREATE ROLE runledger_worker NOLOGIN;
    END IF;
END $$;
DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO runledger_worker', current_schema());
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I TO runledger_worker', current_schema());
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA %I TO runledger_worker', current_schema());
    EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE ON %I.audit_log FROM runledger_worker', current_schema());
END $$;
