"""The projection worker: the Faust app, the Kafka consumers, the retry schedule, the outbox and the checks of
stored offsets against the log."""
