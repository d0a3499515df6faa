"""runledger's Kafka side and its tools: the worker, the producer client, operator tools, dev tooling, the
command line and the one settings object."""
