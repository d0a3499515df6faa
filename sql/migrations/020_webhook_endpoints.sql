-- Webhook subscriptions (issue 25, docs/webhooks.md): where runledger delivers the events that match a filter, kept
-- by `runledger webhooks` as the owner. Each endpoint has signing secrets (Standard Webhooks whsec_), each sealed with
-- AES-256-GCM under RUNLEDGER_SOURCES_KEY_FILE as the sources' are (the database never holds one in the clear; the
-- associated data names the endpoint, so no sealed secret opens as another's). A removed endpoint keeps its row (its
-- deliveries' history names it) with removed_at set.
CREATE TABLE webhook_endpoints (
    endpoint_id     text PRIMARY KEY CHECK (endpoint_id ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$'),
    url             text NOT NULL CHECK (length(url) BETWEEN 1 AND 2000),
    types           text[] NOT NULL DEFAULT '{}',   -- the event types delivered; none: every type
    stream_prefix   text NOT NULL DEFAULT '' CHECK (length(stream_prefix) <= 200),
    source          text CHECK (length(source) BETWEEN 1 AND 1000),  -- only this CloudEvents source; NULL: any
    enabled         boolean NOT NULL DEFAULT true,
    disabled_reason text,
    disabled_at     timestamptz,
    failing_since   timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    removed_at      timestamptz
);

CREATE TABLE webhook_secrets (
    endpoint_id text NOT NULL REFERENCES webhook_endpoints,
    secret_no   integer NOT NULL CHECK (secret_no >= 1),
    sealed      bytea NOT NULL,  -- 12-byte nonce, then the AES-GCM ciphertext and tag
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,     -- a rotation's overlap: deliveries are signed with every secret not expired
    PRIMARY KEY (endpoint_id, secret_no)
);

DO $$
DECLARE
    s text := current_schema();
BEGIN
    EXECUTE format('REVOKE ALL ON %I.webhook_endpoints, %I.webhook_secrets FROM runledger_reader, runledger_worker, '
                   'runledger_producer, runledger_api', s, s);
END $$;
