-- Webhook endpoints over the HTTP API (docs/http.md "Webhooks"): a source manages the endpoints it added, and no
-- other's; an endpoint it added is delivered only what the source may read, while it may read it and is not revoked
-- (the delivery worker checks both at every batch). An endpoint added by `runledger webhooks` (the owner) has no
-- owner_source and no such bound.
ALTER TABLE webhook_endpoints ADD COLUMN owner_source text REFERENCES sources;
CREATE INDEX webhook_endpoints_owner ON webhook_endpoints (owner_source) WHERE owner_source IS NOT NULL;

DO $$
DECLARE
    s text := current_schema();
BEGIN
    -- serve (runledger_api) adds and keeps its callers' endpoints and their sealed secrets; an endpoint enabled
    -- again has its pending messages' retries counted afresh. It reads no message, no attempt, no other table.
    EXECUTE format('GRANT SELECT, INSERT ON %I.webhook_endpoints, %I.webhook_secrets TO runledger_api', s, s);
    EXECUTE format('GRANT UPDATE (enabled, disabled_reason, disabled_at, failing_since, removed_at) ON '
                   '%I.webhook_endpoints TO runledger_api', s);
    EXECUTE format('GRANT UPDATE (expires_at) ON %I.webhook_secrets TO runledger_api', s);
    EXECUTE format('GRANT SELECT (endpoint_id, state, attempts), UPDATE (replayed_after) ON %I.webhook_messages '
                   'TO runledger_api', s);
    -- The delivery worker bounds an endpoint a source added by what that source may read now.
    EXECUTE format('GRANT SELECT (source_id, read_prefixes, revoked_at) ON %I.sources TO runledger_worker', s);
END $$;
