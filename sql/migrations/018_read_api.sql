-- The read API (`runledger serve`, docs/http.md "Reading") lists executions newest first, by (started_at,
-- stream_id), with optional filters on status, workflow and customer and a started_at range, a page at a time from a
-- cursor. One index per filter, each ending in (started_at, stream_id), lets a page read only its rows in order; they
-- replace the single-column indexes of migrations 001 and 010, which are their prefixes (a panel that filters on
-- status, workflow or started_at alone uses them the same). Built in the migration's transaction: on a large live
-- database, run `runledger db migrate` while the workers are stopped.
CREATE INDEX executions_started ON executions (started_at, stream_id);
CREATE INDEX executions_status_started ON executions (status, started_at, stream_id);
CREATE INDEX executions_workflow_started ON executions (workflow, started_at, stream_id);
CREATE INDEX executions_customer_started ON executions (customer_id, started_at, stream_id);
DROP INDEX executions_started_at;
DROP INDEX executions_status;
DROP INDEX executions_workflow;

-- The newest checkpoint of a partition (GET /v1/checkpoints/latest, and the one covering an event for a proof).
CREATE INDEX checkpoints_origin_size ON checkpoints (origin, size, id);
