-- The sources of `runledger serve` (README "HTTP front door", docs/http.md "Authentication"): who may append over
-- HTTP, as which CloudEvents source, to which streams, and read which; their secrets, each sealed with AES-256-GCM
-- under RUNLEDGER_SOURCES_KEY_FILE (the database never holds one in the clear). Written by `runledger sources` as
-- the owner; read, and nothing else, by `serve`'s login runledger_api, once per request: a revocation holds at once
-- on every replica.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'runledger_api') THEN
        CREATE ROLE runledger_api NOLOGIN;
    END IF;
END $$;

CREATE TABLE sources (
    source_id       text PRIMARY KEY CHECK (source_id ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$'),
    source          text NOT NULL UNIQUE CHECK (length(source) BETWEEN 1 AND 1000),  -- the CloudEvents source
    append_prefixes text[] NOT NULL DEFAULT '{}',
    read_prefixes   text[] NOT NULL DEFAULT '{}',
    rate_per_s      double precision NOT NULL CHECK (rate_per_s > 0),  -- events appended per second, on average
    burst           integer NOT NULL CHECK (burst >= 1),               -- and at most at once
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz
);

-- A source's credentials: v1 (an HMAC-SHA256 whsec_ secret) or v1a (an Ed25519 whpk_ public key). Rotation gives
-- the ones in use an expires_at (the overlap) and adds a new one; a request is accepted if one of its signatures
-- matches one credential that has neither expired nor been revoked.
CREATE TABLE source_secrets (
    source_id  text NOT NULL REFERENCES sources ON DELETE CASCADE,
    secret_no  integer NOT NULL CHECK (secret_no >= 1),
    scheme     text NOT NULL CHECK (scheme IN ('v1', 'v1a')),
    sealed     bytea NOT NULL,  -- 12-byte nonce, then the AES-GCM ciphertext and tag; (source_id, secret_no) is its AAD
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    revoked_at timestamptz,
    PRIMARY KEY (source_id, secret_no)
);

DO $$
DECLARE
    s text := current_schema();
BEGIN
    -- serve's login: what the read API serves (the projection, the stored events and their proofs, checkpoints)
    -- and the sources; no write anywhere, no payload of the dead letters, no offsets, no outbox.
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO runledger_api', s);
    EXECUTE format('GRANT SELECT ON %I.executions, %I.steps, %I.costs, %I.artifacts, %I.audit_log, %I.stream_heads, '
                   '%I.checkpoints, %I.log_trees, %I.log_tree_nodes, %I.sources, %I.source_secrets TO runledger_api',
                   s, s, s, s, s, s, s, s, s, s, s);
    -- The dashboards' reader and the others see no source and no sealed secret.
    EXECUTE format('REVOKE ALL ON %I.sources, %I.source_secrets FROM runledger_reader, runledger_worker, '
                   'runledger_producer', s, s);
END $$;
