-- One transparency log per partition of the log topic, defined by Kafka alone (SPEC.md section 7): leaf i of
-- partition p is the i-th record a consumer reads from p from its start, and its input is the record's value
-- byte for byte, valid event or not. The worker that owns a partition appends its leaves in the batch's
-- transaction, under the partition's own row of log_trees, which no other partition's batch takes.
--
-- log_trees: one row per tree, its size, the offset after its last leaf and the roots of the perfect subtrees
-- its size splits into (largest first). A tree is retired, never changed back, when its partition's log is
-- recreated (`runledger offsets reset`): a new tree starts for the new log.
-- log_tree_nodes: the hash of every perfect subtree (level 0: SHA-256(0x00 || value), with the record's offset),
-- so the root at any size and any proof come from O(log n) rows.
--
-- The single database-derived tree of migration 005 is retired: the database cannot prove itself. Checkpoints
-- signed of it stay in `checkpoints` as they were signed; the trees of a log projected before this migration
-- are built from Kafka by `runledger trees rebuild` (workers hold such partitions back until then).
CREATE TABLE log_trees (
    id           integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic        text NOT NULL,
    partition    integer NOT NULL,
    size         bigint NOT NULL DEFAULT 0,
    next_offset  bigint NOT NULL DEFAULT 0,
    peaks        bytea[] NOT NULL DEFAULT '{}',
    retired_at   timestamptz
);
CREATE UNIQUE INDEX log_trees_current ON log_trees (topic, partition) WHERE retired_at IS NULL;

CREATE TABLE log_tree_nodes (
    tree          integer NOT NULL REFERENCES log_trees (id),
    level         smallint NOT NULL,
    index         bigint NOT NULL,
    hash          bytea NOT NULL,
    kafka_offset  bigint,
    PRIMARY KEY (tree, level, index)
);
CREATE UNIQUE INDEX log_tree_leaves ON log_tree_nodes (tree, kafka_offset) WHERE level = 0;

CREATE TRIGGER log_tree_nodes_no_update_delete BEFORE UPDATE OR DELETE ON log_tree_nodes
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();
CREATE TRIGGER log_tree_nodes_no_truncate BEFORE TRUNCATE ON log_tree_nodes
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();

-- Each event's leaf: the tree of the log partition it was read from (kafka_topic, kafka_partition: its position in
-- the log topic, also when it was applied from a retry topic, a parking or a replay) and its index there.
ALTER TABLE audit_log ADD COLUMN tree integer, ADD COLUMN leaf_index bigint;
CREATE INDEX audit_log_position ON audit_log (kafka_topic, kafka_partition, kafka_offset);

DROP TABLE tlog_nodes;
DROP TABLE tlog_state;
ALTER TABLE audit_log DROP COLUMN tlog_index;

-- A checkpoint of a partition's tree names the partition; NULL: one of the retired single tree.
ALTER TABLE checkpoints ADD COLUMN kafka_partition integer;

-- What the signer found when the database's copy of a tree disagreed with the tree it derived from Kafka.
CREATE TABLE tree_findings (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    origin       text NOT NULL,
    leaf_index   bigint,
    kafka_offset bigint,
    finding      text NOT NULL,
    detected_at  timestamptz NOT NULL DEFAULT now()
);

DO $$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %1$I.log_trees TO runledger_worker', current_schema());
    EXECUTE format('GRANT SELECT, INSERT ON %1$I.log_tree_nodes TO runledger_worker', current_schema());
    EXECUTE format('GRANT SELECT, INSERT ON %1$I.tree_findings TO runledger_worker', current_schema());
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA %I TO runledger_worker', current_schema());
END $$;
