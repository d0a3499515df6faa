"""The producer client: appends hash-chained events to the log, with chain heads coordinated in Redis and
recovered from the log. It never imports the PostgreSQL side."""
