-- The dashboards' and the report's panels read executions and costs over a time range (Grafana's time
-- picker, `runledger report --since/--until`): these indexes serve them without a scan of the whole table.
-- Built in the migration's transaction, they hold writes to the two tables until done: on a large live
-- database, run `runledger db migrate` while the workers are stopped (they catch up from the log after).
CREATE INDEX executions_started_at ON executions (started_at);
CREATE INDEX costs_occurred_at ON costs (occurred_at);
