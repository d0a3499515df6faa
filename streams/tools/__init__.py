"""Operator tools: rebuild the projection from the log, inspect and replay dead letters, check the chain heads."""
