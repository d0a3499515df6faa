"""The SQL runledger runs, shipped as package data: numbered migrations (``migrations/NNN_name.sql``) and
the named queries of ``queries.sql``, read by ``runledger.projections.postgres.queries``."""
