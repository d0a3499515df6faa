"""The PostgreSQL side of the projection: connections and error translation, migrations, the named queries,
applying batches, checksums, read-your-writes waits and run reports."""
