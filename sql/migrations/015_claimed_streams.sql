-- A dead letter names a stream only if its record proves it belongs there (its hash verifies: README "Which stream a
-- dead letter blocks"); the subject of a record that proves nothing is kept apart, as the stream it claims, so that
-- it never blocks that stream nor answers `runledger wait` for it.
ALTER TABLE dead_letters ADD COLUMN claimed_stream_id text;
CREATE INDEX dead_letters_claimed_stream ON dead_letters (claimed_stream_id) WHERE claimed_stream_id IS NOT NULL;

-- Letters written before: a record whose hash does not verify, or whose subject is no stream id, proves no stream.
-- (Other invalid_event and unknown_type letters keep theirs: whether their hash verified was not recorded.)
UPDATE dead_letters SET claimed_stream_id = stream_id, stream_id = NULL
WHERE stream_id IS NOT NULL AND (reason = 'hash_mismatch' OR stream_id !~ '^[A-Za-z0-9._:-]{1,200}$');
