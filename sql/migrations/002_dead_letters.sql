-- Dead letters replace rejected_events: every record that failed for good (or ran out of retries),
-- byte for byte, with why, how often, and what became of it. Kept for ever; never deleted.
CREATE TABLE dead_letters (
    id                bigserial PRIMARY KEY,
    reason            text NOT NULL,
    error             text NOT NULL,
    attempts          integer NOT NULL,
    first_failure_at  timestamptz NOT NULL,
    last_failure_at   timestamptz NOT NULL,
    -- Where the record was first read (the log), and its bytes.
    topic             text NOT NULL,
    partition         integer NOT NULL,
    "offset"          bigint NOT NULL,
    key               bytea,
    value             bytea NOT NULL,
    -- Known when the record is JSON with these fields, even if it is not a valid event.
    stream_id         text,
    seq               bigint,
    event_id          text,
    event_type        text,
    -- Where the copy in the dead-letter topic is (NULL for rows older than the topic).
    dlq_topic         text,
    dlq_partition     integer,
    dlq_offset        bigint,
    status            text NOT NULL DEFAULT 'dead' CHECK (status IN ('dead', 'replayed', 'resolved')),
    status_at         timestamptz,
    status_by         text,
    note              text,
    replays           integer NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now()
);
-- One open letter per original record: a record delivered again after a crash does not count twice.
CREATE UNIQUE INDEX dead_letters_open_record ON dead_letters (topic, partition, "offset", md5(value))
    WHERE status = 'dead';
CREATE INDEX dead_letters_stream ON dead_letters (stream_id, seq);
CREATE INDEX dead_letters_reason ON dead_letters (reason, created_at);

INSERT INTO dead_letters (reason, error, attempts, first_failure_at, last_failure_at, topic, partition, "offset",
                          key, value, stream_id, seq, event_id, created_at)
SELECT reason, error, 1, rejected_at, rejected_at, kafka_topic, kafka_partition, kafka_offset, kafka_key, value,
       stream_id, seq, event_id, rejected_at
FROM rejected_events ORDER BY id;
DROP TABLE rejected_events;

-- Every `runledger dlq replay`: who ran it, with which filter, and what became of each record.
CREATE TABLE dlq_replays (
    id           bigserial PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    run_by       text NOT NULL,
    filter       jsonb NOT NULL,
    status       text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'interrupted', 'failed')),
    selected     integer NOT NULL DEFAULT 0,
    outcomes     jsonb NOT NULL DEFAULT '{}'
);
CREATE TABLE dlq_replay_items (
    replay_id       bigint NOT NULL REFERENCES dlq_replays (id),
    dead_letter_id  bigint NOT NULL REFERENCES dead_letters (id),
    outcome         text NOT NULL,
    detail          text NOT NULL,
    at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (replay_id, dead_letter_id)
);

-- How many deliveries an event took (1: first try; more: it went through the retry topics), and the order
-- events were applied in (per stream it must follow seq).
ALTER TABLE audit_log ADD COLUMN attempts integer NOT NULL DEFAULT 1;
ALTER TABLE audit_log ADD COLUMN applied_order bigint GENERATED ALWAYS AS IDENTITY;

DO $$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %1$I.dead_letters, %1$I.dlq_replays, %1$I.dlq_replay_items '
                   'TO runledger_worker', current_schema());
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA %I TO runledger_worker', current_schema());
END $$;
