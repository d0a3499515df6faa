-- Named queries of the projection store. Each starts with "-- name: <name>"; all take $n parameters.

-- name: apply_lock
SELECT pg_advisory_xact_lock_shared(hashtext('runledger.apply:' || current_schema()));

-- name: switch_lock
SELECT pg_advisory_xact_lock(hashtext('runledger.apply:' || $1));

-- One `runledger rebuild` of a live schema ($1) at a time: a session lock, released when its connection closes.
-- name: rebuild_lock
SELECT pg_try_advisory_lock(hashtext('runledger.rebuild'), hashtext($1));

-- The rebuild schemas of a live schema ($1: a LIKE pattern), newest first, with their comment (the rules'
-- fingerprint, set once complete) and how many of the derived tables ($2) they hold.
-- name: rebuild_schemas
SELECT n.nspname, obj_description(n.oid, 'pg_namespace') AS comment,
       (SELECT count(*) FROM pg_tables t WHERE t.schemaname = n.nspname AND t.tablename = ANY($2::text[])) AS derived
FROM pg_namespace n WHERE n.nspname LIKE $1 ORDER BY n.nspname DESC;

-- name: switch_lock_timeout
-- How long the switch-over waits for a lock before it gives up (this transaction only).
SELECT set_config('lock_timeout', $1, true);

-- name: notify_projected
SELECT pg_notify('runledger_projected', current_schema());

-- name: load_heads
SELECT stream_id, seq, hash FROM stream_heads WHERE stream_id = ANY($1::text[]) FOR UPDATE;

-- name: load_executions
SELECT * FROM executions WHERE stream_id = ANY($1::text[]);

-- name: load_steps
SELECT * FROM steps WHERE stream_id = ANY($1::text[]);

-- The projected events with these ids: a delivery with the same hash is a duplicate, with another an id_conflict.
-- name: load_projected_ids
SELECT event_id::text, stream_id, seq, hash FROM audit_log WHERE event_id = ANY($1::uuid[]);

-- name: load_parked
SELECT stream_id, seq, event_id::text, value, kafka_topic, kafka_partition, kafka_offset
FROM parked_events WHERE stream_id = ANY($1::text[]);

-- Set-based writes: one statement per table and batch, each column an array ($n::type[]) unnested into rows.
-- A key appears at most once per batch (the planner sees to it), as ON CONFLICT DO UPDATE requires.

-- name: upsert_executions
INSERT INTO executions (stream_id, workflow, agent_id, customer_id, status, started_at, ended_at, duration_ms,
    steps_total, steps_running, steps_retrying, steps_completed, steps_failed, steps_skipped,
    input_tokens, output_tokens, cached_tokens, cost_usd, unpriced_costs, budget_usd, error,
    last_seq, last_hash, updated_at)
SELECT *, now() FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
    $7::timestamptz[], $8::bigint[], $9::int[], $10::int[], $11::int[], $12::int[], $13::int[], $14::int[],
    $15::bigint[], $16::bigint[], $17::bigint[], $18::numeric[], $19::int[], $20::numeric[], $21::jsonb[],
    $22::bigint[], $23::text[])
ON CONFLICT (stream_id) DO UPDATE SET
    status = EXCLUDED.status, ended_at = EXCLUDED.ended_at, duration_ms = EXCLUDED.duration_ms,
    steps_total = EXCLUDED.steps_total, steps_running = EXCLUDED.steps_running,
    steps_retrying = EXCLUDED.steps_retrying, steps_completed = EXCLUDED.steps_completed,
    steps_failed = EXCLUDED.steps_failed, steps_skipped = EXCLUDED.steps_skipped,
    input_tokens = EXCLUDED.input_tokens, output_tokens = EXCLUDED.output_tokens,
    cached_tokens = EXCLUDED.cached_tokens, cost_usd = EXCLUDED.cost_usd,
    unpriced_costs = EXCLUDED.unpriced_costs, error = EXCLUDED.error,
    last_seq = EXCLUDED.last_seq, last_hash = EXCLUDED.last_hash, updated_at = now();

-- name: upsert_steps
INSERT INTO steps (stream_id, step_id, name, step_order, status, attempts, started_at, ended_at, error, cost_usd)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::bigint[],
    $7::timestamptz[], $8::timestamptz[], $9::jsonb[], $10::numeric[])
ON CONFLICT (stream_id, step_id) DO UPDATE SET
    name = EXCLUDED.name, step_order = EXCLUDED.step_order, status = EXCLUDED.status,
    attempts = EXCLUDED.attempts, started_at = EXCLUDED.started_at, ended_at = EXCLUDED.ended_at,
    error = EXCLUDED.error, cost_usd = EXCLUDED.cost_usd;

-- name: upsert_artifacts
INSERT INTO artifacts (stream_id, artifact_id, step_id, type, name, uri, size_bytes, content_type, created_at, seq)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[],
    $8::text[], $9::timestamptz[], $10::bigint[])
ON CONFLICT (stream_id, artifact_id) DO UPDATE SET
    step_id = EXCLUDED.step_id, type = EXCLUDED.type, name = EXCLUDED.name, uri = EXCLUDED.uri,
    size_bytes = EXCLUDED.size_bytes, content_type = EXCLUDED.content_type,
    created_at = EXCLUDED.created_at, seq = EXCLUDED.seq;

-- name: upsert_heads
INSERT INTO stream_heads (stream_id, seq, hash, updated_at)
SELECT *, now() FROM unnest($1::text[], $2::bigint[], $3::text[])
ON CONFLICT (stream_id) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash, updated_at = now();

-- name: park
INSERT INTO parked_events (stream_id, seq, event_id, value, kafka_topic, kafka_partition, kafka_offset, parked_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, now())
ON CONFLICT DO NOTHING;

-- name: unpark
DELETE FROM parked_events WHERE stream_id = $1 AND seq = $2 AND event_id = $3::uuid;

-- name: insert_dead_letter
-- Returns no row when the record already has an open letter (delivered again after a crash).
INSERT INTO dead_letters (reason, error, attempts, first_failure_at, last_failure_at, topic, partition, "offset",
    key, value, stream_id, seq, event_id, event_type, claimed_stream_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
ON CONFLICT (topic, partition, "offset", md5(value)) WHERE status = 'dead' DO NOTHING
RETURNING id;

-- name: set_dead_letter_copy
UPDATE dead_letters SET dlq_topic = $2, dlq_partition = $3, dlq_offset = $4 WHERE id = $1;

-- name: dead_letter_failed_again
UPDATE dead_letters SET reason = $2, error = $3, attempts = attempts + 1, last_failure_at = $4,
    replays = replays + 1
WHERE id = $1;

-- name: open_dead_streams
SELECT DISTINCT stream_id FROM dead_letters WHERE stream_id = ANY($1::text[]) AND status = 'dead';

-- name: lock_streams
-- One transaction at a time per stream (workers, retry agents and replays may meet on one), in one global
-- order so that two transactions never wait for each other.
SELECT count(pg_advisory_xact_lock(hashtext('runledger.stream:' || current_schema()), k))
FROM (SELECT DISTINCT hashtext(s) AS k FROM unnest($1::text[]) AS s ORDER BY k) AS keys;

-- name: save_offset
-- $5: SHA-256 of the record at next_offset - 1. Offsets only move forward here (`runledger offsets reset` is
-- the one way back).
INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, last_sha256, updated_at)
VALUES ($1, $2, $3, $4, $5, now())
ON CONFLICT (group_id, topic, partition) DO UPDATE
SET next_offset = EXCLUDED.next_offset, last_sha256 = EXCLUDED.last_sha256, updated_at = now()
WHERE EXCLUDED.next_offset > consumer_offsets.next_offset;

-- name: load_offsets
SELECT partition, next_offset, last_sha256 FROM consumer_offsets WHERE group_id = $1 AND topic = $2;

-- name: reset_offset
UPDATE consumer_offsets SET next_offset = $4, last_sha256 = NULL, updated_at = now()
WHERE group_id = $1 AND topic = $2 AND partition = $3;

-- Copies to publish after commit (`streams.forward.Publisher`).

-- name: insert_outbox
INSERT INTO outbox (topic, key, value, headers, dead_letter_id) VALUES ($1, $2, $3, $4, $5);

-- name: outbox_claim
-- Up to $1 rows no publisher holds (or whose claim ran out: its publisher died or froze), oldest first, claimed for
-- $2 seconds: a time in the row, not a lock, so no transaction stays open while their copies are sent.
WITH claimed AS (
    UPDATE outbox SET claimed_until = now() + make_interval(secs => $2)
    WHERE id IN (SELECT id FROM outbox WHERE claimed_until IS NULL OR claimed_until < now()
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
    RETURNING id, topic, key, value, headers, dead_letter_id)
SELECT c.id, c.topic, c.key, coalesce(c.value, d.value) AS value, c.headers, c.dead_letter_id
FROM claimed c LEFT JOIN dead_letters d ON d.id = c.dead_letter_id ORDER BY c.id;

-- name: outbox_done
DELETE FROM outbox WHERE id = ANY($1::bigint[]);

-- name: outbox_release
-- Rows claimed whose copies Kafka did not acknowledge: free for the next publisher now.
UPDATE outbox SET claimed_until = NULL WHERE id = ANY($1::bigint[]);

-- name: outbox_backlog
SELECT count(*) AS rows, min(created_at) AS oldest FROM outbox;

-- Partitions a worker will not project (see `streams.logcheck`), and the live workers.

-- name: problem_set
INSERT INTO log_problems (group_id, topic, partition, partitions, stored_offset, log_start, log_end, problem,
    detected_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())
ON CONFLICT (group_id, topic, partition) DO UPDATE SET partitions = EXCLUDED.partitions,
    stored_offset = EXCLUDED.stored_offset, log_start = EXCLUDED.log_start, log_end = EXCLUDED.log_end,
    problem = EXCLUDED.problem, detected_at = CASE WHEN log_problems.problem = EXCLUDED.problem
        THEN log_problems.detected_at ELSE now() END;

-- name: problem_clear
DELETE FROM log_problems WHERE group_id = $1 AND topic = $2 AND partition = ANY($3::integer[]);

-- name: problems
SELECT * FROM log_problems WHERE group_id = $1 AND topic = $2 ORDER BY partition;

-- name: worker_seen
INSERT INTO workers (worker_id, group_id, host, pid, started_at, seen_at, partitions, metrics_url)
VALUES ($1, $2, $3, $4, $5, now(), $6, $7)
ON CONFLICT (worker_id) DO UPDATE SET seen_at = now(), partitions = EXCLUDED.partitions;

-- The gauges a worker reads from PostgreSQL (streams/metrics.py): the same in every worker.
-- name: metrics_state
SELECT (SELECT count(*) FROM outbox) AS outbox,
       (SELECT count(*) FROM workers WHERE seen_at > now() - interval '10 seconds') AS workers_live,
       (SELECT count(*) FROM dead_letters WHERE status = 'dead') AS dead_open,
       (SELECT count(*) FROM dlq_replays) AS replay_runs,
       (SELECT coalesce(jsonb_object_agg(outcome, n), '{}') FROM
           (SELECT outcome, count(*) AS n FROM dlq_replay_items GROUP BY outcome) o) AS replayed,
       (SELECT coalesce(sum(size), 0) FROM log_trees WHERE retired_at IS NULL) AS tree_size,
       (SELECT count(*) FROM tree_findings) AS tree_findings,
       (SELECT sum(size) FROM (SELECT max(size) AS size FROM checkpoints WHERE kafka_partition IS NOT NULL
                               GROUP BY origin) c) AS checkpoint_size,
       (SELECT extract(epoch FROM max(signed_at)) FROM checkpoints) AS checkpoint_time,
       (SELECT coalesce(jsonb_object_agg(check_name, jsonb_build_object(
            'at', extract(epoch FROM finished_at), 'findings', findings, 'events', events)), '{}')
        FROM (SELECT DISTINCT ON (check_name) * FROM verifications ORDER BY check_name, finished_at DESC) v)
           AS verified;

-- name: record_verification
INSERT INTO verifications (check_name, seconds, events, findings, codes) VALUES ($1, $2, $3, $4, $5);

-- name: worker_gone
DELETE FROM workers WHERE worker_id = $1;

-- name: live_workers
-- $2: seconds without a sign of life after which a worker counts as gone.
SELECT worker_id, host, pid, started_at, seen_at, partitions FROM workers
WHERE group_id = $1 AND seen_at > now() - make_interval(secs => $2) ORDER BY started_at;

-- name: current_catalog
SELECT version FROM price_catalogs ORDER BY loaded_at DESC, version DESC LIMIT 1;

-- name: load_prices
SELECT model, provider, input_usd_per_token, output_usd_per_token, cached_usd_per_token
FROM model_prices WHERE version = $1;

-- name: insert_catalog
INSERT INTO price_catalogs (version, source, models, loaded_at) VALUES ($1, $2, $3, now())
ON CONFLICT (version) DO NOTHING;

-- name: insert_price
INSERT INTO model_prices (version, model, provider, input_usd_per_token, output_usd_per_token, cached_usd_per_token)
VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING;

-- name: event_status
-- Everything known about one (stream, seq): its projection, rejections, parking, and the stream head.
SELECT 'projected' AS status, event_id::text AS event_id, hash, NULL AS reason, NULL AS error, seq, 0::bigint AS rank
FROM audit_log WHERE stream_id = $1 AND seq = $2
UNION ALL
SELECT 'rejected', event_id, NULL, reason, error, seq, id FROM dead_letters
WHERE stream_id = $1 AND seq = $2 AND status <> 'replayed'
UNION ALL
SELECT 'parked', event_id::text, NULL, NULL, NULL, seq, 0 FROM parked_events WHERE stream_id = $1 AND seq = $2
UNION ALL
SELECT 'head', NULL, hash, NULL, NULL, seq, 0 FROM stream_heads WHERE stream_id = $1
ORDER BY rank DESC;

-- Summaries of one demo run: $1 is the run tag, which every stream id of the run starts with, then ':'.

-- name: run_progress
SELECT coalesce(sum(seq), 0)::bigint AS projected,
       (SELECT count(*) FROM dead_letters WHERE left(stream_id, length($1) + 1) = $1 || ':') AS rejected
FROM stream_heads WHERE left(stream_id, length($1) + 1) = $1 || ':';

-- name: run_by_status
SELECT status, count(*) AS executions FROM executions
WHERE left(stream_id, length($1) + 1) = $1 || ':' GROUP BY status ORDER BY count(*) DESC, status;

-- name: run_by_model
SELECT provider, model, count(*) AS calls, sum(input_tokens)::bigint AS input_tokens,
       sum(output_tokens)::bigint AS output_tokens, coalesce(sum(cost_usd), 0) AS cost_usd,
       count(*) FILTER (WHERE cost_source = 'catalog') AS from_catalog,
       count(*) FILTER (WHERE cost_source = 'unpriced') AS unpriced
FROM costs WHERE left(stream_id, length($1) + 1) = $1 || ':'
GROUP BY provider, model ORDER BY coalesce(sum(cost_usd), 0) DESC, provider, model;

-- name: run_by_workflow
SELECT workflow, count(*) AS executions, sum(cost_usd) AS cost_usd, sum(unpriced_costs)::bigint AS unpriced,
       count(*) FILTER (WHERE status = 'completed') AS completed
FROM executions WHERE left(stream_id, length($1) + 1) = $1 || ':'
GROUP BY workflow ORDER BY sum(cost_usd) DESC, workflow;

-- name: run_top_executions
SELECT stream_id, workflow, status, cost_usd, budget_usd, unpriced_costs, duration_ms FROM executions
WHERE left(stream_id, length($1) + 1) = $1 || ':' ORDER BY cost_usd DESC, stream_id LIMIT $2;

-- name: all_runs
SELECT (SELECT count(*) FROM executions) AS executions, (SELECT coalesce(sum(seq), 0) FROM stream_heads)::bigint AS events;

-- name: run_audit_events
SELECT raw FROM audit_log WHERE left(stream_id, length($1) + 1) = $1 || ':' ORDER BY stream_id, seq;

-- name: bench_create_raw
-- `runledger bench` baseline: raw records, no processing.
CREATE TABLE bench_raw (topic text, partition integer, kafka_offset bigint, key bytea, value bytea);

-- Dead letters: `runledger dlq`. A NULL filter argument matches everything.

-- name: dlq_select
SELECT * FROM dead_letters
WHERE ($1::bigint[] IS NULL OR id = ANY($1))
  AND ($2::text[] IS NULL OR reason = ANY($2))
  AND ($3::text[] IS NULL OR event_type = ANY($3))
  AND ($4::text[] IS NULL OR stream_id = ANY($4) OR claimed_stream_id = ANY($4))
  AND ($5::timestamptz IS NULL OR created_at >= $5)
  AND ($6::timestamptz IS NULL OR created_at < $6)
  AND ($7::text[] IS NULL OR status = ANY($7))
ORDER BY stream_id NULLS LAST, seq NULLS LAST, id
LIMIT $8;

-- name: dlq_lock_letter
SELECT status FROM dead_letters WHERE id = $1 FOR UPDATE;

-- name: dlq_mark_replayed
UPDATE dead_letters SET status = 'replayed', status_at = now(), status_by = $2, replays = replays + 1
WHERE id = $1 AND status = 'dead';

-- name: dlq_resolve
UPDATE dead_letters SET status = 'resolved', status_at = now(), status_by = $2, note = $3
WHERE id = ANY($1::bigint[]) AND status = 'dead'
RETURNING id;

-- name: dlq_start_replay
INSERT INTO dlq_replays (run_by, filter, selected) VALUES ($1, $2::text::jsonb, $3) RETURNING id;

-- name: dlq_replay_item
INSERT INTO dlq_replay_items (replay_id, dead_letter_id, outcome, detail) VALUES ($1, $2, $3, $4)
ON CONFLICT DO NOTHING;

-- name: dlq_finish_replay
UPDATE dlq_replays SET finished_at = now(), status = $2, outcomes = $3::text::jsonb WHERE id = $1;

-- name: dlq_replays
SELECT id, started_at, finished_at, run_by, filter::text AS filter, status, selected, outcomes::text AS outcomes
FROM dlq_replays ORDER BY id DESC LIMIT $1;

-- name: dlq_letter_replays
SELECT r.id AS replay_id, r.run_by, i.outcome, i.detail, i.at
FROM dlq_replay_items i JOIN dlq_replays r ON r.id = i.replay_id
WHERE i.dead_letter_id = $1 ORDER BY i.at;

-- name: dlq_parked_behind
SELECT seq FROM parked_events WHERE stream_id = $1 ORDER BY seq;

-- Verification reads one snapshot: the streams named by $1 (a stream id, or NULL for all) and $2 (NULL, or only
-- streams with an event recorded or a head moved since then).
-- name: verify_count
SELECT count(*) FROM audit_log
WHERE ($1::text IS NULL OR stream_id = $1)
  AND ($2::timestamptz IS NULL OR stream_id IN (SELECT stream_id FROM audit_log WHERE recorded_at >= $2));

-- name: verify_audit
SELECT stream_id, seq, raw, event_id::text, hash, prevhash FROM audit_log
WHERE ($1::text IS NULL OR stream_id = $1)
  AND ($2::timestamptz IS NULL OR stream_id IN (SELECT stream_id FROM audit_log WHERE recorded_at >= $2))
ORDER BY stream_id, seq, event_id;

-- name: verify_heads
SELECT stream_id, seq, hash FROM stream_heads
WHERE ($1::text IS NULL OR stream_id = $1)
  AND ($2::timestamptz IS NULL OR updated_at >= $2
       OR stream_id IN (SELECT stream_id FROM audit_log WHERE recorded_at >= $2));

-- The transparency logs, one per log partition (migration 012). A batch locks the rows of the partitions it
-- read fresh records from (their owner's: no other worker takes them), creating a tree on its first leaf.
-- name: tree_create
INSERT INTO log_trees (topic, partition) SELECT $1, p FROM unnest($2::int[]) AS p
ON CONFLICT (topic, partition) WHERE retired_at IS NULL DO NOTHING;

-- name: tree_lock
SELECT id, partition, size, next_offset, peaks FROM log_trees
WHERE topic = $1 AND partition = ANY($2::int[]) AND retired_at IS NULL ORDER BY partition FOR UPDATE;

-- name: tree_grow
UPDATE log_trees SET size = $2, next_offset = $3, peaks = $4 WHERE id = $1;

-- The leaves of records read before (from a retry topic, a parking, a replay): ($1, $2, $3) one per record.
-- name: tree_leaves_at
SELECT want.topic, want.partition, want.kafka_offset, t.id AS tree, n.index FROM
    unnest($1::text[], $2::int[], $3::bigint[]) AS want(topic, partition, kafka_offset)
JOIN log_trees t ON t.topic = want.topic AND t.partition = want.partition AND t.retired_at IS NULL
JOIN log_tree_nodes n ON n.tree = t.id AND n.level = 0 AND n.kafka_offset = want.kafka_offset;

-- name: trees
SELECT id, topic, partition, size, next_offset, peaks FROM log_trees WHERE retired_at IS NULL AND topic = $1
ORDER BY partition;

-- name: tree_retire
UPDATE log_trees SET retired_at = now() WHERE topic = $1 AND partition = $2 AND retired_at IS NULL;

-- name: tree_nodes
SELECT n.level, n.index, n.hash FROM log_tree_nodes n
JOIN unnest($2::smallint[], $3::bigint[]) AS want(level, index) USING (level, index) WHERE n.tree = $1;

-- Level 0 of a tree in order: what `verify log` compares with Kafka when it differs.
-- name: tree_leaves
SELECT index, hash, kafka_offset FROM log_tree_nodes WHERE tree = $1 AND level = 0 ORDER BY index;

-- Audit rows that name no partition of the log topic ($1, $2: its partitions).
-- name: audit_elsewhere
SELECT kafka_topic, kafka_partition, kafka_offset, event_id::text, stream_id, seq FROM audit_log
WHERE kafka_topic <> $1 OR kafka_partition <> ALL($2::int[]);

-- What PartitionComparer.leaves_digest computes of the records' leaves, of the stored ones, in index order: over
-- the hashes, and over the offsets (8 bytes each, big-endian).
-- name: tree_leaves_digest
SELECT sha256(coalesce(string_agg(hash, ''::bytea ORDER BY index), ''::bytea)) AS leaves,
       sha256(coalesce(string_agg(int8send(kafka_offset), ''::bytea ORDER BY index), ''::bytea)) AS offsets
FROM log_tree_nodes WHERE tree = $1 AND level = 0;

-- name: tree_leaf_range
SELECT index, hash, kafka_offset FROM log_tree_nodes WHERE tree = $1 AND level = 0 AND index >= $2 AND index < $3
ORDER BY index;

-- name: event_leaf
SELECT a.stream_id, a.raw, a.leaf_index, a.kafka_topic, a.kafka_partition, a.kafka_offset, a.tree FROM audit_log a
WHERE a.event_id = $1::uuid;

-- name: round_idle_bound
-- A signer round in a worker reads the log between its statements: its transaction may idle for up to 10 minutes,
-- not a batch's few seconds (RUNLEDGER_DB_IDLE_IN_TRANSACTION_TIMEOUT_S), and only it.
SELECT set_config('idle_in_transaction_session_timeout', '10min', true);

-- One signer round of a schema at a time (a worker's timer, `runledger signer`, `runledger checkpoint`).
-- name: checkpoint_try_lock
SELECT pg_try_advisory_xact_lock(hashtext('runledger.checkpoint:' || current_schema()));

-- name: checkpoint_lock
SELECT pg_advisory_xact_lock(hashtext('runledger.checkpoint:' || current_schema()));

-- name: checkpoint_due
-- Not if one was signed within the interval ($1 seconds).
SELECT NOT EXISTS (SELECT 1 FROM checkpoints WHERE signed_at > now() - make_interval(secs => $1));

-- A published checkpoint, kept unless it is already.
-- name: keep_checkpoint
INSERT INTO checkpoints (origin, size, root, key_name, note, kafka_partition)
SELECT $1, $2, $3, $4, $5, $6 WHERE NOT EXISTS (SELECT 1 FROM checkpoints WHERE origin = $1 AND size = $2 AND note = $5);

-- name: covering_checkpoint
SELECT note FROM checkpoints WHERE size > $1 AND origin = $2 ORDER BY size DESC, id DESC LIMIT 1;

-- name: insert_tree_finding
INSERT INTO tree_findings (origin, leaf_index, kafka_offset, finding) VALUES ($1, $2, $3, $4);

-- The audit rows of one log partition in log order: `verify log` compares each with the record at its position.
-- name: audit_at_positions
SELECT kafka_offset, sha256('\x00'::bytea || raw) AS leaf, tree, leaf_index FROM audit_log
WHERE kafka_topic = $1 AND kafka_partition = $2 ORDER BY kafka_offset, event_id;

-- What names the events of the rows at some positions ($3), in the order of audit_at_positions.
-- name: audit_names_at
SELECT kafka_offset, event_id::text, stream_id, seq FROM audit_log
WHERE kafka_topic = $1 AND kafka_partition = $2 AND kafka_offset = ANY($3::bigint[]) ORDER BY kafka_offset, event_id;

-- name: audit_by_ids
SELECT event_id::text, stream_id, seq, hash, kafka_partition, kafka_offset FROM audit_log
WHERE event_id = ANY($1::uuid[]);

-- The log positions ($1: the log topic) of the retry copies in the outbox, not published yet.
-- name: outbox_positions
SELECT (headers->>'runledger.original.partition')::int AS partition,
       (headers->>'runledger.original.offset')::bigint AS "offset"
FROM outbox WHERE value IS NOT NULL AND headers->>'runledger.original.topic' = $1;

-- The dead letters and parked events at some positions of a partition ($3), with the bytes they hold.
-- name: letters_at_positions
SELECT "offset", value FROM dead_letters WHERE topic = $1 AND partition = $2 AND "offset" = ANY($3::bigint[])
UNION ALL
SELECT kafka_offset, value FROM parked_events
WHERE kafka_topic = $1 AND kafka_partition = $2 AND kafka_offset = ANY($3::bigint[]);

-- name: verify_prices
SELECT version, model, provider, input_usd_per_token, output_usd_per_token, cached_usd_per_token
FROM model_prices ORDER BY version, model;

-- name: verify_catalogs
SELECT * FROM price_catalogs ORDER BY version;

-- name: verify_executions
SELECT stream_id, workflow, agent_id, customer_id, status, started_at, ended_at, duration_ms, steps_total,
       steps_running, steps_retrying, steps_completed, steps_failed, steps_skipped, input_tokens, output_tokens,
       cached_tokens, cost_usd, unpriced_costs, budget_usd, error, last_seq, last_hash
FROM executions WHERE stream_id = ANY($1::text[]);

-- name: verify_steps
SELECT stream_id, step_id, name, step_order, status, attempts, started_at, ended_at, error, cost_usd
FROM steps WHERE stream_id = ANY($1::text[]);

-- name: verify_costs
SELECT event_id::text, stream_id, seq, step_id, provider, model, input_tokens, output_tokens, cached_tokens,
       cost_usd, cost_source, catalog_version, occurred_at
FROM costs WHERE stream_id = ANY($1::text[]);

-- name: verify_artifacts
SELECT stream_id, artifact_id, step_id, type, name, uri, size_bytes, content_type, created_at, seq
FROM artifacts WHERE stream_id = ANY($1::text[]);

-- The events of the streams named by $1 (an array), as verify_audit reads them.
-- name: verify_audit_of
SELECT stream_id, seq, raw, event_id::text, hash, prevhash FROM audit_log
WHERE stream_id = ANY($1::text[]) ORDER BY stream_id, seq;

-- `verify projection`'s digests ($1, $2 as for verify_count), in the same order of streams: the bytes of each
-- stream's events in seq order (hashed by the verifier: PostgreSQL's own sha256 is 4 times slower), and a digest
-- of each of those streams' projection rows (whole rows as PostgreSQL writes them as text, each table's in key
-- order; NULL if it has none). Text of timestamps depends on the session: verify_session fixes it.
-- name: verify_raw
SELECT stream_id, raw FROM audit_log
WHERE ($1::text IS NULL OR stream_id = $1)
  AND ($2::timestamptz IS NULL OR stream_id IN (SELECT stream_id FROM audit_log WHERE recorded_at >= $2))
ORDER BY stream_id, seq;

-- name: verify_row_digests
SELECT s.stream_id, d.digest FROM (
    SELECT DISTINCT stream_id FROM audit_log
    WHERE ($1::text IS NULL OR stream_id = $1)
      AND ($2::timestamptz IS NULL OR stream_id IN (SELECT stream_id FROM audit_log WHERE recorded_at >= $2))
) s LEFT JOIN (
    SELECT stream_id, sha256(convert_to(string_agg(row, E'\n' ORDER BY key COLLATE "C"), 'UTF8')) AS digest
    FROM (
        SELECT stream_id, 'e' AS key, e::text AS row FROM executions e
        UNION ALL SELECT stream_id, 's' || step_id, s::text FROM steps s
        UNION ALL SELECT stream_id, 'c' || event_id::text, c::text FROM costs c
        UNION ALL SELECT stream_id, 'a' || artifact_id, a::text FROM artifacts a
    ) r
    WHERE ($1::text IS NULL OR stream_id = $1)
      AND ($2::timestamptz IS NULL OR stream_id IN (SELECT stream_id FROM audit_log WHERE recorded_at >= $2))
    GROUP BY stream_id
) d USING (stream_id)
ORDER BY s.stream_id;

-- name: verify_session
-- The events are read in the order of the (stream_id, seq) index: sorting their bytes instead spills to disk.
SET LOCAL timezone = 'UTC'; SET LOCAL datestyle = 'ISO, YMD'; SET LOCAL intervalstyle = 'postgres';
SET LOCAL enable_sort = off;

-- name: verify_orphans
-- Projection rows of streams that have no stored event at all ($1: one stream, or NULL for all).
SELECT 'executions' AS "table", stream_id, stream_id AS key FROM executions e
WHERE ($1::text IS NULL OR stream_id = $1) AND NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.stream_id = e.stream_id)
UNION ALL
SELECT 'steps', stream_id, step_id FROM steps s
WHERE ($1::text IS NULL OR stream_id = $1) AND NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.stream_id = s.stream_id)
UNION ALL
SELECT 'costs', stream_id, event_id::text FROM costs c
WHERE ($1::text IS NULL OR stream_id = $1) AND NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.stream_id = c.stream_id)
UNION ALL
SELECT 'artifacts', stream_id, artifact_id FROM artifacts r
WHERE ($1::text IS NULL OR stream_id = $1) AND NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.stream_id = r.stream_id)
ORDER BY 1, 2, 3;

-- The panels of the executions, cost and integrity dashboards (projections/postgres/panels.py), run as they
-- are by Grafana's PostgreSQL datasource and by `runledger report --html`. A time series gives (time, metric,
-- value) rows; a bar chart (label, value); a table any columns. Money stays numeric.
-- The range in 120 buckets (as Grafana's $__interval would), from its start.
-- name: panel_executions_by_status
SELECT date_bin(($2::timestamptz - $1::timestamptz) / 120, started_at, $1::timestamptz) AS time, status AS metric,
       count(*) AS value
FROM executions WHERE started_at >= $1::timestamptz AND started_at < $2::timestamptz GROUP BY 1, 2 ORDER BY 1, 2;

-- name: panel_duration_by_workflow
SELECT workflow AS label, round((percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) / 1000.0)::numeric, 3)
       AS value
FROM executions WHERE duration_ms IS NOT NULL AND started_at >= $1::timestamptz AND started_at < $2::timestamptz
GROUP BY 1 ORDER BY 2 DESC LIMIT 20;

-- name: panel_failure_rate
SELECT date_trunc('day', started_at, 'UTC') AS time, 'failed or timed out' AS metric,
       round(100.0 * count(*) FILTER (WHERE status IN ('failed', 'timeout')) / count(*), 2) AS value
FROM executions WHERE started_at >= $1::timestamptz AND started_at < $2::timestamptz GROUP BY 1 ORDER BY 1;

-- name: panel_top_failing_workflows
SELECT workflow, count(*) FILTER (WHERE status IN ('failed', 'timeout')) AS failed, count(*) AS executions,
       round(100.0 * count(*) FILTER (WHERE status IN ('failed', 'timeout')) / count(*), 1) AS failed_pct
FROM executions WHERE started_at >= $1::timestamptz AND started_at < $2::timestamptz
GROUP BY workflow HAVING count(*) FILTER (WHERE status IN ('failed', 'timeout')) > 0
ORDER BY failed DESC, workflow LIMIT 10;

-- name: panel_spend_by_model
SELECT model AS label, sum(cost_usd) AS value FROM costs
WHERE cost_usd IS NOT NULL AND occurred_at >= $1::timestamptz AND occurred_at < $2::timestamptz
GROUP BY 1 ORDER BY 2 DESC LIMIT 20;

-- name: panel_spend_by_provider
SELECT provider AS label, sum(cost_usd) AS value FROM costs
WHERE cost_usd IS NOT NULL AND occurred_at >= $1::timestamptz AND occurred_at < $2::timestamptz
GROUP BY 1 ORDER BY 2 DESC LIMIT 20;

-- name: panel_spend_by_workflow
SELECT e.workflow AS label, sum(c.cost_usd) AS value
FROM costs c JOIN executions e USING (stream_id)
WHERE c.cost_usd IS NOT NULL AND c.occurred_at >= $1::timestamptz AND c.occurred_at < $2::timestamptz
GROUP BY 1 ORDER BY 2 DESC LIMIT 20;

-- name: panel_spend_by_day
SELECT date_trunc('day', occurred_at, 'UTC') AS time, 'spend (USD)' AS metric, sum(cost_usd) AS value
FROM costs WHERE cost_usd IS NOT NULL AND occurred_at >= $1::timestamptz AND occurred_at < $2::timestamptz
GROUP BY 1 ORDER BY 1;

-- Executions started in the range, against their budget (their whole spend, whenever it occurred).
-- name: panel_budget_burn
SELECT stream_id AS execution, workflow, cost_usd, budget_usd, round(100 * cost_usd / budget_usd, 1) AS used_pct
FROM executions WHERE budget_usd > 0 AND started_at >= $1::timestamptz AND started_at < $2::timestamptz
ORDER BY cost_usd / budget_usd DESC, stream_id LIMIT 15;

-- name: panel_unpriced_usage
SELECT model AS label, count(*) AS value FROM costs
WHERE cost_source = 'unpriced' AND occurred_at >= $1::timestamptz AND occurred_at < $2::timestamptz
GROUP BY 1 ORDER BY 2 DESC LIMIT 20;

-- name: panel_verifications
SELECT DISTINCT ON (check_name) check_name AS "check", finished_at, events, findings,
       CASE WHEN findings = 0 THEN 'intact' ELSE 'NOT INTACT' END AS result
FROM verifications ORDER BY check_name, finished_at DESC;

-- name: panel_checkpoints
SELECT signed_at, size, origin, key_name FROM checkpoints ORDER BY id DESC LIMIT 10;

-- The stored offsets with the next offset of each partition's current tree (NULL: no tree), read in one
-- statement: a batch commits both together, so they agree unless the tree lags (projected before migration 012).
-- name: load_offsets_trees
SELECT o.partition, o.next_offset, o.last_sha256, t.next_offset AS tree_offset FROM consumer_offsets o
LEFT JOIN log_trees t ON t.topic = o.topic AND t.partition = o.partition AND t.retired_at IS NULL
WHERE o.group_id = $1 AND o.topic = $2 ORDER BY o.partition;

-- `runledger trees rebuild`: a partition's stored offset, read under its tree's row lock.
-- name: tree_rebuild_target
SELECT next_offset, last_sha256 FROM consumer_offsets WHERE group_id = $1 AND topic = $2 AND partition = $3;

-- The audit rows at the positions of tree $1's leaves from index $2 on that name no leaf yet: their leaf.
-- name: tree_rebuild_audit
UPDATE audit_log a SET tree = n.tree, leaf_index = n.index FROM log_tree_nodes n
WHERE n.tree = $1 AND n.level = 0 AND n.index >= $2 AND a.kafka_topic = $3 AND a.kafka_partition = $4
    AND a.kafka_offset = n.kafka_offset AND a.tree IS NULL;

-- The read API (streams/http/reads.py, docs/http.md "Reading"). Only streams whose id starts with one of the
-- caller's read prefixes ($1; "" is every stream), filtered here, before a page is cut (^@ is starts_with: no
-- wildcards; PostgreSQL estimates it from the column's statistics). An absent filter is NULL:
-- the api login plans each statement for its parameters (plan_cache_mode force_custom_plan), so a filter given
-- uses its index (migration 018) and one absent costs nothing. Newest first; the cursor ($7, $8) is the
-- (started_at, stream_id) of the previous page's last row. $9 is one more than the page holds: whether there is
-- a next page.
-- name: read_executions
SELECT stream_id, workflow, agent_id, customer_id, status, started_at, ended_at, duration_ms, steps_total,
       cost_usd, last_seq, updated_at
FROM executions
WHERE stream_id ^@ ANY ($1::text[])
  AND ($2::text IS NULL OR status = $2)
  AND ($3::text IS NULL OR workflow = $3)
  AND ($4::text IS NULL OR customer_id = $4)
  AND ($5::timestamptz IS NULL OR started_at >= $5)
  AND ($6::timestamptz IS NULL OR started_at < $6)
  AND ($7::timestamptz IS NULL OR (started_at, stream_id) < ($7, $8::text))
ORDER BY started_at DESC, stream_id DESC
LIMIT $9;

-- name: read_execution
SELECT stream_id, workflow, agent_id, customer_id, status, started_at, ended_at, duration_ms, steps_total,
       steps_running, steps_retrying, steps_completed, steps_failed, steps_skipped, input_tokens, output_tokens,
       cached_tokens, cost_usd, unpriced_costs, budget_usd, error, last_seq, last_hash, updated_at
FROM executions WHERE stream_id = $1;

-- name: read_steps
SELECT step_id, name, step_order, status, attempts, started_at, ended_at, error, cost_usd FROM steps
WHERE stream_id = $1 ORDER BY step_order NULLS LAST, started_at NULLS LAST, step_id;

-- name: read_costs
SELECT event_id::text, seq, step_id, provider, model, input_tokens, output_tokens, cached_tokens, cost_usd,
       cost_source, catalog_version, occurred_at FROM costs
WHERE stream_id = $1 ORDER BY seq, event_id;

-- name: read_artifacts
SELECT artifact_id, step_id, type, name, uri, size_bytes, content_type, created_at, seq FROM artifacts
WHERE stream_id = $1 ORDER BY seq, artifact_id;

-- A stream's events as stored (the record's bytes), in seq order after $2, $3 at most.
-- name: read_events
SELECT seq, raw FROM audit_log WHERE stream_id = $1 AND seq > $2 ORDER BY seq LIMIT $3;

-- name: read_stream_known
SELECT EXISTS (SELECT FROM audit_log WHERE stream_id = $1);

-- The newest checkpoint of each origin in $1 (the current log topic's partitions).
-- name: read_latest_checkpoints
SELECT c.id, c.origin, c.kafka_partition, c.size, c.root, c.key_name, c.note, c.signed_at
FROM unnest($1::text[]) AS o(origin)
CROSS JOIN LATERAL (SELECT k.id, k.origin, k.kafka_partition, k.size, k.root, k.key_name, k.note, k.signed_at
                    FROM checkpoints k WHERE k.origin = o.origin ORDER BY k.size DESC, k.id DESC LIMIT 1) c
ORDER BY c.kafka_partition;

-- The partitions of topic $1 that have a tree (and so may have checkpoints).
-- name: read_tree_partitions
SELECT partition FROM log_trees WHERE topic = $1 AND retired_at IS NULL ORDER BY partition;

-- The HTTP sources (migration 016, streams/http/sources.py). A request's source and its usable credentials, read
-- by serve's login when its cache (streams/http/sourcecache.py) does not hold them; the seconds until the first of
-- them expires bound how long it may.
-- name: source_credentials
SELECT s.source_id, s.source, s.append_prefixes, s.read_prefixes, s.rate_per_s, s.burst, k.secret_no, k.scheme,
       k.sealed, extract(epoch FROM k.expires_at - now())::float8 AS expires_in_s
FROM sources s JOIN source_secrets k USING (source_id)
WHERE s.source_id = $1 AND s.revoked_at IS NULL AND k.revoked_at IS NULL
  AND (k.expires_at IS NULL OR k.expires_at > now())
ORDER BY k.secret_no DESC;

-- name: source_insert
INSERT INTO sources (source_id, source, append_prefixes, read_prefixes, rate_per_s, burst)
VALUES ($1, $2, $3, $4, $5, $6);

-- The number of a source's next secret (its row locked by source_lock).
-- name: source_next_secret_no
SELECT coalesce(max(secret_no), 0) + 1 FROM source_secrets WHERE source_id = $1;

-- name: source_secret_insert
INSERT INTO source_secrets (source_id, secret_no, scheme, sealed) VALUES ($1, $2, $3, $4);

-- name: source_lock
SELECT source_id, revoked_at FROM sources WHERE source_id = $1 FOR UPDATE;

-- name: source_secrets_expire
UPDATE source_secrets SET expires_at = least(coalesce(expires_at, 'infinity'), now() + make_interval(secs => $2))
WHERE source_id = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now());

-- name: source_revoke
WITH s AS (UPDATE sources SET revoked_at = coalesce(revoked_at, now()) WHERE source_id = $1 RETURNING source_id)
UPDATE source_secrets k SET revoked_at = coalesce(k.revoked_at, now()) FROM s WHERE k.source_id = s.source_id;

-- name: source_list
SELECT s.source_id, s.source, s.append_prefixes, s.read_prefixes, s.rate_per_s, s.burst, s.created_at, s.revoked_at,
       coalesce(jsonb_agg(jsonb_build_object('secret_no', k.secret_no, 'scheme', k.scheme,
                                             'created_at', k.created_at, 'expires_at', k.expires_at,
                                             'revoked_at', k.revoked_at) ORDER BY k.secret_no)
                FILTER (WHERE k.secret_no IS NOT NULL), '[]') AS secrets
FROM sources s LEFT JOIN source_secrets k USING (source_id)
GROUP BY s.source_id ORDER BY s.source_id;

-- Webhook endpoints (migration 020, streams/webhooks/endpoints.py), kept by `runledger webhooks` as the owner.
-- name: webhook_insert
INSERT INTO webhook_endpoints (endpoint_id, url, types, stream_prefix, source, owner_source)
VALUES ($1, $2, $3, $4, $5, $6);

-- The source that added an endpoint over the HTTP API (NULL: the owner did, or no such endpoint).
-- name: webhook_owner
SELECT owner_source FROM webhook_endpoints WHERE endpoint_id = $1 AND removed_at IS NULL;

-- name: webhook_owned
SELECT endpoint_id FROM webhook_endpoints WHERE owner_source = $1 AND removed_at IS NULL;

-- The number of an endpoint's next secret (its row inserted or locked in the same transaction).
-- name: webhook_next_secret_no
SELECT coalesce(max(secret_no), 0) + 1 FROM webhook_secrets WHERE endpoint_id = $1;

-- name: webhook_secret_insert
INSERT INTO webhook_secrets (endpoint_id, secret_no, sealed) VALUES ($1, $2, $3);

-- name: webhook_lock
SELECT endpoint_id FROM webhook_endpoints WHERE endpoint_id = $1 AND removed_at IS NULL FOR UPDATE;

-- name: webhook_secrets_expire
UPDATE webhook_secrets SET expires_at = least(coalesce(expires_at, 'infinity'), now() + make_interval(secs => $2))
WHERE endpoint_id = $1 AND (expires_at IS NULL OR expires_at > now());

-- name: webhook_set_enabled
UPDATE webhook_endpoints SET enabled = $2, disabled_reason = CASE WHEN $2 THEN NULL ELSE $3 END,
       disabled_at = CASE WHEN $2 THEN NULL ELSE now() END, failing_since = CASE WHEN $2 THEN NULL ELSE failing_since END
WHERE endpoint_id = $1 AND removed_at IS NULL
RETURNING endpoint_id;

-- name: webhook_remove
UPDATE webhook_endpoints SET removed_at = now(), enabled = false WHERE endpoint_id = $1 AND removed_at IS NULL
RETURNING endpoint_id;

-- name: webhook_list
SELECT e.endpoint_id, e.url, e.types, e.stream_prefix, e.source, e.enabled, e.disabled_reason, e.disabled_at,
       e.failing_since, e.created_at,
       coalesce(jsonb_agg(jsonb_build_object('secret_no', k.secret_no, 'created_at', k.created_at,
                                             'expires_at', k.expires_at) ORDER BY k.secret_no)
                FILTER (WHERE k.secret_no IS NOT NULL AND (k.expires_at IS NULL OR k.expires_at > now())), '[]')
           AS secrets
FROM webhook_endpoints e LEFT JOIN webhook_secrets k USING (endpoint_id)
WHERE e.removed_at IS NULL AND ($1::text IS NULL OR e.endpoint_id = $1)
GROUP BY e.endpoint_id ORDER BY e.endpoint_id;

-- An endpoint's URL and its secrets in use, newest first: what a delivery is signed with.
-- name: webhook_delivery_secrets
SELECT e.url, k.secret_no, k.sealed
FROM webhook_endpoints e JOIN webhook_secrets k USING (endpoint_id)
WHERE e.endpoint_id = $1 AND e.removed_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())
ORDER BY k.secret_no DESC;

-- Webhook deliveries (migration 021, streams/webhooks/), kept by the delivery workers as runledger_worker.
-- name: webhook_endpoints_all
-- What matching needs of every endpoint not removed (a disabled one is still owed what it misses), and for one a
-- source added, what that source may read now (none once it is revoked).
SELECT e.endpoint_id, e.types, e.stream_prefix, e.source, e.created_at, e.owner_source IS NOT NULL AS owned,
       CASE WHEN s.revoked_at IS NULL THEN s.read_prefixes ELSE '{}' END AS scope
FROM webhook_endpoints e LEFT JOIN sources s ON s.source_id = e.owner_source
WHERE e.removed_at IS NULL;

-- name: webhook_enqueue
-- Messages owed; a record read again, or copied twice into the log, is the message already there; another event at
-- a seq owed already (a fork the projection dead-letters) is not owed. Returns the messages written now.
INSERT INTO webhook_messages (msg_id, endpoint_id, stream_id, seq, event_id, event_type, event_hash, event_time,
    log_partition, log_offset, body)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::text[],
                     $8::timestamptz[], $9::int[], $10::bigint[], $11::bytea[])
ON CONFLICT DO NOTHING
RETURNING msg_id;

-- name: webhook_known
-- Which of $1 are messages already (the rest conflict with another event at their endpoint, stream and seq).
SELECT msg_id FROM webhook_messages WHERE msg_id = ANY($1::text[]);

-- name: webhook_owed
-- Up to $2 messages to send now, at most $3 of each (endpoint, stream), in seq order, and bodies of about $6 bytes
-- at most (the first always): pending, of enabled endpoints, of the log partitions $1 this worker holds, behind no
-- retrying or dead message of their (endpoint, stream), of no (endpoint, stream) in ($4, $5) (being sent already or
-- resting), and, for an endpoint a source added, of a stream that source may read now.
SELECT msg_id, endpoint_id, stream_id, seq, event_time, body, attempts, replayed_after FROM (
    SELECT *, sum(octet_length(body)) OVER (ORDER BY endpoint_id, stream_id, seq) - octet_length(body) AS before
    FROM (
        SELECT m.msg_id, m.endpoint_id, m.stream_id, m.seq, m.event_time, m.body, m.attempts, m.replayed_after,
               row_number() OVER (PARTITION BY m.endpoint_id, m.stream_id ORDER BY m.seq) AS n
        FROM webhook_messages m JOIN webhook_endpoints e USING (endpoint_id)
        WHERE m.state = 'pending' AND e.enabled AND e.removed_at IS NULL AND m.log_partition = ANY($1::int[])
          AND (e.owner_source IS NULL OR EXISTS (
              SELECT 1 FROM sources s, unnest(s.read_prefixes) AS p(prefix)
              WHERE s.source_id = e.owner_source AND s.revoked_at IS NULL AND starts_with(m.stream_id, p.prefix)))
          AND NOT EXISTS (SELECT 1 FROM webhook_messages b
                          WHERE b.endpoint_id = m.endpoint_id AND b.stream_id = m.stream_id AND b.seq < m.seq
                            AND b.state IN ('retrying', 'dead'))
          AND (m.endpoint_id, m.stream_id) NOT IN (SELECT * FROM unnest($4::text[], $5::text[]))
    ) runs WHERE n <= $3 ORDER BY endpoint_id, stream_id, seq LIMIT $2
) owed WHERE before < $6 ORDER BY endpoint_id, stream_id, seq;

-- name: webhook_message
-- A message as a retry finds it, and whether it may be sent (its endpoint enabled and, for one a source added, the
-- stream one that source may read now).
SELECT m.msg_id, m.endpoint_id, m.stream_id, m.seq, m.event_time, m.body, m.attempts, m.replayed_after, m.state,
       e.enabled AND e.removed_at IS NULL AND (e.owner_source IS NULL OR EXISTS (
           SELECT 1 FROM sources s, unnest(s.read_prefixes) AS p(prefix)
           WHERE s.source_id = e.owner_source AND s.revoked_at IS NULL AND starts_with(m.stream_id, p.prefix)))
           AS enabled
FROM webhook_messages m JOIN webhook_endpoints e USING (endpoint_id) WHERE m.msg_id = $1;

-- name: webhook_record
-- Attempts made: each moves its message on (only from where it was when the attempt began, so a duplicate attempt
-- moves nothing) and is kept as a row of webhook_deliveries. Returns the messages moved.
WITH a AS (
    SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::timestamptz[], $5::int[], $6::float8[], $7::text[],
                         $8::text[], $9::text[], $10::text[], $11::timestamptz[])
        AS a(msg_id, attempt, endpoint_id, attempted_at, status, latency_ms, response, error, address, outcome, due_at)
), moved AS (
    UPDATE webhook_messages m
    SET state = CASE a.outcome WHEN 'retry' THEN 'retrying' ELSE a.outcome END, attempts = a.attempt,
        due_at = a.due_at, delivered_at = CASE WHEN a.outcome = 'delivered' THEN a.attempted_at END
    FROM a WHERE m.msg_id = a.msg_id AND m.attempts = a.attempt - 1 AND m.state IN ('pending', 'retrying')
    RETURNING m.msg_id
)
INSERT INTO webhook_deliveries (msg_id, attempt, endpoint_id, attempted_at, status, latency_ms, response, error,
    address, outcome)
SELECT a.msg_id, a.attempt, a.endpoint_id, a.attempted_at, a.status, a.latency_ms, a.response, a.error, a.address,
       a.outcome
FROM a JOIN moved USING (msg_id)
ON CONFLICT DO NOTHING
RETURNING msg_id;

-- name: webhook_outbox
-- The copies of messages that failed: to a retry topic or the dead-letter topic, their value the message's body.
INSERT INTO outbox (topic, key, value, headers)
SELECT c.topic, convert_to(m.stream_id, 'UTF8'), m.body, c.headers
FROM unnest($1::text[], $2::text[], $3::jsonb[]) AS c(msg_id, topic, headers) JOIN webhook_messages m USING (msg_id);

-- name: webhook_health
-- Endpoints that answered ($2: ok) at $3: a success ends a failure, the first failure starts one.
UPDATE webhook_endpoints e
SET failing_since = CASE WHEN h.ok THEN NULL ELSE coalesce(e.failing_since, h.at) END
FROM unnest($1::text[], $2::bool[], $3::timestamptz[]) AS h(endpoint_id, ok, at)
WHERE e.endpoint_id = h.endpoint_id AND e.failing_since IS DISTINCT FROM
      (CASE WHEN h.ok THEN NULL ELSE coalesce(e.failing_since, h.at) END);

-- name: webhook_disable_failing
-- Endpoints of $1 failing for longer than $2 seconds: disabled, with the reason; returns them.
UPDATE webhook_endpoints
SET enabled = false, disabled_at = now(),
    disabled_reason = format('failing since %s, longer than %s s (RUNLEDGER_WEBHOOK_DISABLE_AFTER_S)',
                             to_char(failing_since AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), $2::float8)
WHERE endpoint_id = ANY($1::text[]) AND enabled AND failing_since < now() - make_interval(secs => $2)
RETURNING endpoint_id, disabled_reason;

-- name: webhook_set_pending
-- A retrying message of an endpoint disabled meanwhile waits, pending, for the endpoint to be enabled again, its
-- retries then counted afresh (as `enable` counts those pending already).
UPDATE webhook_messages SET state = 'pending', due_at = NULL, replayed_after = attempts
WHERE msg_id = $1 AND state = 'retrying' AND attempts = $2 - 1;

-- name: webhook_retry_overdue
-- Retrying messages whose copy has not come back $1 seconds past due (lost: its retry topic no longer read, or kept
-- for less time than the workers were away): pending again, the dispatcher sends them. Returns how many.
WITH overdue AS (
    UPDATE webhook_messages SET state = 'pending', due_at = NULL
    WHERE state = 'retrying' AND due_at < now() - make_interval(secs => $1)
    RETURNING msg_id)
SELECT count(*) FROM overdue;

-- name: webhook_gauges
SELECT (SELECT count(*) FROM webhook_messages WHERE state IN ('pending', 'retrying')) AS owed,
       (SELECT count(*) FROM webhook_messages WHERE state = 'dead') AS dead,
       (SELECT count(*) FROM webhook_endpoints WHERE removed_at IS NULL AND failing_since IS NOT NULL) AS failing,
       (SELECT count(*) FROM webhook_endpoints WHERE removed_at IS NULL AND NOT enabled) AS disabled;

-- name: webhook_messages_select
-- Messages by id ($1), or of an endpoint ($2), state ($3), stream ($4), seq range ($5, $6), owed since ($7), in
-- (endpoint, stream, seq) order, at most $8; with their last attempt.
SELECT m.msg_id, m.endpoint_id, m.stream_id, m.seq, m.event_id, m.event_type, m.state, m.attempts, m.created_at,
       m.delivered_at, m.due_at, d.attempted_at AS last_attempt_at, d.status AS last_status, d.error AS last_error,
       d.response AS last_response
FROM webhook_messages m
LEFT JOIN LATERAL (SELECT * FROM webhook_deliveries d WHERE d.msg_id = m.msg_id ORDER BY d.attempt DESC LIMIT 1) d
    ON true
WHERE ($1::text[] IS NULL OR m.msg_id = ANY($1)) AND ($2::text IS NULL OR m.endpoint_id = $2)
  AND ($3::text[] IS NULL OR m.state = ANY($3)) AND ($4::text IS NULL OR m.stream_id = $4)
  AND ($5::bigint IS NULL OR m.seq >= $5) AND ($6::bigint IS NULL OR m.seq <= $6)
  AND ($7::timestamptz IS NULL OR m.created_at >= $7)
ORDER BY m.endpoint_id, m.stream_id, m.seq LIMIT $8;

-- name: webhook_attempts
SELECT msg_id, attempt, attempted_at, status, latency_ms, response, error, address, outcome
FROM webhook_deliveries WHERE msg_id = ANY($1::text[]) ORDER BY msg_id, attempt;

-- name: webhook_replay
-- Messages of $1 delivered or dead, owed again: sent in seq order by the worker that holds their partition, their
-- retries counted afresh. A message pending or retrying is owed already and stays as it is.
UPDATE webhook_messages SET state = 'pending', replayed_after = attempts, due_at = NULL, delivered_at = NULL
WHERE msg_id = ANY($1::text[]) AND state IN ('delivered', 'dead')
RETURNING msg_id;

-- name: webhook_replay_audit
INSERT INTO webhook_replays (run_by, filter, msg_ids) VALUES ($1, $2, $3) RETURNING id, run_at;

-- name: webhook_retries_afresh
-- An endpoint enabled again: what it missed is retried on the whole schedule again.
UPDATE webhook_messages SET replayed_after = attempts WHERE endpoint_id = $1 AND state = 'pending';
