-- The transparency log over audit_log (RFC 9162 section 2.1). Every projected event is a leaf, in the order
-- the workers commit them (audit_log.tlog_index); the leaf is the event's 32-byte hash. tlog_nodes holds the
-- hash of every perfect subtree (level 0: the leaf hashes, SHA-256(0x00 || hash)), written in the batch's
-- transaction, so the root at any size and any proof come from O(log n) rows, never from rereading the log.
-- tlog_state is the tree's size; a batch locks its one row to append, which orders the leaves.
ALTER TABLE audit_log ADD COLUMN tlog_index bigint;
CREATE UNIQUE INDEX audit_log_tlog_index ON audit_log (tlog_index);

CREATE TABLE tlog_nodes (
    level  smallint NOT NULL,
    index  bigint NOT NULL,
    hash   bytea NOT NULL,
    PRIMARY KEY (level, index)
);

CREATE TABLE tlog_state (
    one   boolean PRIMARY KEY DEFAULT true CHECK (one),
    size  bigint NOT NULL
);

CREATE TRIGGER tlog_nodes_no_update_delete BEFORE UPDATE OR DELETE ON tlog_nodes
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();
CREATE TRIGGER tlog_nodes_no_truncate BEFORE TRUNCATE ON tlog_nodes
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();

-- Events stored before this migration join the tree in the order they were recorded.
DO $$
DECLARE
    row record;
    n bigint := 0;
    carry bigint;
    level smallint;
    peaks bytea[] := '{}';
    merged bytea;
BEGIN
    ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update_delete;
    FOR row IN SELECT event_id, hash FROM audit_log
               ORDER BY recorded_at, kafka_topic, kafka_partition, kafka_offset, event_id LOOP
        UPDATE audit_log SET tlog_index = n WHERE event_id = row.event_id;
        merged := sha256('\x00'::bytea || decode(row.hash, 'hex'));
        INSERT INTO tlog_nodes VALUES (0, n, merged);
        peaks := peaks || merged;
        carry := n;
        level := 0;
        WHILE carry % 2 = 1 LOOP
            merged := sha256('\x01'::bytea || peaks[cardinality(peaks) - 1] || peaks[cardinality(peaks)]);
            peaks := peaks[1:cardinality(peaks) - 2] || merged;
            carry := carry / 2;
            level := level + 1;
            INSERT INTO tlog_nodes VALUES (level, carry, merged);
        END LOOP;
        n := n + 1;
    END LOOP;
    ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_update_delete;
    INSERT INTO tlog_state (size) VALUES (n);
    EXECUTE format('GRANT SELECT, INSERT ON %1$I.tlog_nodes TO runledger_worker', current_schema());
    EXECUTE format('GRANT SELECT, UPDATE ON %1$I.tlog_state TO runledger_worker', current_schema());
END $$;
ALTER TABLE audit_log ALTER COLUMN tlog_index SET NOT NULL;
