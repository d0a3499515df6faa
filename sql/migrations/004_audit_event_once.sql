-- The audit row keeps the event once: its bytes as received (raw), which the hash covers. The data as
-- jsonb was a second copy that every batch encoded and PostgreSQL parsed and stored, and no query read;
-- audit_events shows each event as jsonb, computed when read.
ALTER TABLE audit_log DROP COLUMN data;

CREATE VIEW audit_events AS
SELECT event_id, stream_id, seq, type, time, hash, prevhash, convert_from(raw, 'UTF8')::jsonb AS event,
       kafka_topic, kafka_partition, kafka_offset, attempts, recorded_at
FROM audit_log;
