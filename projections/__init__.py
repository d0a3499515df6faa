"""The projection: pure code over events (records of a batch, the planner, rules, pricing) and, in ``postgres``, its
execution against PostgreSQL."""
