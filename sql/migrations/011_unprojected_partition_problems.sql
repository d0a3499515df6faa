-- A partition of which nothing was projected yet can have a problem too: a log that no longer begins at
-- offset 0 (its first records deleted before they were projected). Its problem has no stored offset.
ALTER TABLE log_problems ALTER COLUMN stored_offset DROP NOT NULL;
