-- What a worker needs so that nothing stops it and nothing is lost (SPEC.md sections 4 and 6).

-- Step order and attempt are any integer up to 2^53 - 1 on the wire; integer columns refused 2^31.
ALTER TABLE steps ALTER COLUMN step_order TYPE bigint, ALTER COLUMN attempts TYPE bigint;

-- The SHA-256 of the record at next_offset - 1: on a partition assignment it proves that the log still
-- holds what was projected (a recreated or emptied log topic does not).
ALTER TABLE consumer_offsets ADD COLUMN last_sha256 text;

-- Copies for the retry topics and the dead-letter topic, written in the batch's transaction and published
-- after it commits, so that Kafka never holds a copy whose batch rolled back. A dead letter's copy takes its
-- value from the dead_letters row (value NULL here).
CREATE TABLE outbox (
    id              bigserial PRIMARY KEY,
    topic           text NOT NULL,
    key             bytea,
    value           bytea,
    headers         jsonb NOT NULL,
    dead_letter_id  bigint REFERENCES dead_letters (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((value IS NULL) = (dead_letter_id IS NOT NULL))
);

-- Partitions a worker refuses to project because the log no longer matches the stored offsets.
CREATE TABLE log_problems (
    group_id       text NOT NULL,
    topic          text NOT NULL,
    partition      integer NOT NULL,
    partitions     integer NOT NULL,  -- of the topic, so that `runledger wait` can tell a stream's partition
    stored_offset  bigint NOT NULL,
    log_start      bigint NOT NULL,
    log_end        bigint NOT NULL,
    problem        text NOT NULL,
    detected_at    timestamptz NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
);

-- Live workers: each refreshes its row every few seconds and deletes it when it stops.
CREATE TABLE workers (
    worker_id   text PRIMARY KEY,
    group_id    text NOT NULL,
    host        text NOT NULL,
    pid         integer NOT NULL,
    started_at  timestamptz NOT NULL,
    seen_at     timestamptz NOT NULL,
    partitions  integer[] NOT NULL DEFAULT '{}'
);

DO $$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %1$I.outbox, %1$I.log_problems, %1$I.workers '
                   'TO runledger_worker', current_schema());
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA %I TO runledger_worker', current_schema());
END $$;
