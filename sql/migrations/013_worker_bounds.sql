-- A publisher claims outbox rows for a while (a time in the row, not a lock held by a transaction), sends their
-- copies to Kafka with no transaction open, then deletes them. Rows whose publisher died or froze in between are
-- claimed again once the claim has run out (streams/worker/outbox.py).
ALTER TABLE outbox ADD COLUMN claimed_until timestamptz;
