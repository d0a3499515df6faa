-- The dashboards' and the report's panels read executions and costs over a time range (Grafana's time
-- picker, `runledger report --since/--until`): these indexes serve them without a scan of the whole table.
CREATE INDEX executions_started_at ON executions (started_at);
CREATE INDEX costs_occurred_at ON costs (occurred_at);
