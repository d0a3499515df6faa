-- Signed checkpoints of the transparency log (C2SP tlog-checkpoint notes), as signed and published to
-- <prefix>.checkpoints: kept so that anyone can later be shown the log extends them.
CREATE TABLE checkpoints (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    origin     text NOT NULL,
    size       bigint NOT NULL,
    root       bytea NOT NULL,
    key_name   text NOT NULL,
    note       text NOT NULL,
    signed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX checkpoints_size ON checkpoints (size);

CREATE TRIGGER checkpoints_no_update_delete BEFORE UPDATE OR DELETE ON checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();

DO $$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT ON %1$I.checkpoints TO runledger_worker', current_schema());
END $$;

-- The roots of the perfect subtrees the tree's size splits into, largest first: a batch appends to them
-- and a checkpoint folds them, with no other read.
ALTER TABLE tlog_state ADD COLUMN peaks bytea[] NOT NULL DEFAULT '{}';
DO $$
DECLARE
    n bigint := (SELECT size FROM tlog_state);
    lo bigint := 0;
    bit int;
    found bytea[] := '{}';
BEGIN
    FOR bit IN REVERSE 62..0 LOOP
        IF (n >> bit) & 1 = 1 THEN
            found := found || (SELECT hash FROM tlog_nodes t WHERE t.level = bit AND t.index = lo >> bit);
            lo := lo + (1::bigint << bit);
        END IF;
    END LOOP;
    UPDATE tlog_state SET peaks = found;
END $$;
