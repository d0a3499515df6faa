-- Webhook deliveries (issue 25, streams/webhooks/): what the delivery workers owe each endpoint, and every attempt.
--
-- webhook_messages: one row per (endpoint, event) that matched the endpoint's filter, written by the delivery
-- worker that read the event from the log. msg_id is the Standard Webhooks webhook-id, derived from the endpoint and
-- the event's hash, so a record read twice is one message. An endpoint gets each stream's messages in seq order: a
-- message is sent only once every earlier message of its (endpoint, stream) is delivered, so one that is retrying
-- or dead holds back that endpoint's later events of that stream, and nothing else. body is the record's bytes as
-- the log holds them (what is POSTed).
CREATE TABLE webhook_messages (
    msg_id          text PRIMARY KEY,
    endpoint_id     text NOT NULL REFERENCES webhook_endpoints,
    stream_id       text NOT NULL,
    seq             bigint NOT NULL,
    event_id        text NOT NULL,
    event_type      text NOT NULL,
    event_hash      text NOT NULL,
    event_time      timestamptz NOT NULL,
    log_partition   integer NOT NULL,
    log_offset      bigint NOT NULL,
    body            bytea NOT NULL,
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'retrying', 'delivered', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,  -- made so far, replays included
    replayed_after  integer NOT NULL DEFAULT 0,  -- attempts made before its last replay: retries count from there
    due_at          timestamptz,                 -- a retrying message's next attempt
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    UNIQUE (endpoint_id, stream_id, seq)
);
-- What is still owed, in the order it is owed.
CREATE INDEX webhook_messages_owed ON webhook_messages (endpoint_id, stream_id, seq) WHERE state <> 'delivered';
CREATE INDEX webhook_messages_partition ON webhook_messages (log_partition) WHERE state = 'pending';
CREATE INDEX webhook_messages_retrying ON webhook_messages (due_at) WHERE state = 'retrying';

-- Every attempt, written in the transaction that moves its message on.
CREATE TABLE webhook_deliveries (
    msg_id          text NOT NULL REFERENCES webhook_messages,
    attempt         integer NOT NULL CHECK (attempt >= 1),
    endpoint_id     text NOT NULL,
    attempted_at    timestamptz NOT NULL,
    status          integer,               -- the HTTP status; NULL: no answer (then error says why)
    latency_ms      double precision NOT NULL,
    response        text,                  -- the first KiB of the answer's body
    error           text,
    address         text,                  -- the address connected to
    outcome         text NOT NULL CHECK (outcome IN ('delivered', 'retry', 'dead')),
    PRIMARY KEY (msg_id, attempt)
);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, attempted_at);

-- Every `runledger webhooks replay` that changed something: who, which filter, the messages sent again.
CREATE TABLE webhook_replays (
    id          bigserial PRIMARY KEY,
    run_at      timestamptz NOT NULL DEFAULT now(),
    run_by      text NOT NULL,
    filter      jsonb NOT NULL,
    msg_ids     text[] NOT NULL
);

DO $$
DECLARE
    s text := current_schema();
BEGIN
    -- The delivery worker logs in as runledger_worker: it reads the endpoints and their sealed secrets (opened with
    -- the sources key, which the database never holds), marks an endpoint failing or disabled, and keeps the
    -- messages and attempts. Nobody else but the owner reads them.
    EXECUTE format('GRANT SELECT ON %I.webhook_endpoints, %I.webhook_secrets TO runledger_worker', s, s);
    EXECUTE format('GRANT UPDATE (enabled, disabled_reason, disabled_at, failing_since) ON %I.webhook_endpoints '
                   'TO runledger_worker', s);
    EXECUTE format('GRANT SELECT, INSERT ON %I.webhook_messages, %I.webhook_deliveries TO runledger_worker', s, s);
    EXECUTE format('GRANT UPDATE (state, attempts, replayed_after, due_at, delivered_at) ON %I.webhook_messages TO '
                   'runledger_worker', s);
    EXECUTE format('REVOKE ALL ON %I.webhook_messages, %I.webhook_deliveries, %I.webhook_replays FROM '
                   'runledger_reader, runledger_producer, runledger_api', s, s, s);
END $$;
