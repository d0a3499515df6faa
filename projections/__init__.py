"""The projection: pure rules over events (records of a batch, rules, pricing) and, in ``postgres``, their
execution against PostgreSQL."""
