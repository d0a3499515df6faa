-- `serve` keeps each source it has read (streams/http/sourcecache.py) while PostgreSQL says the sources are
-- unchanged: any statement that changes a source or a credential notifies the channel runledger_sources with the
-- schema's name, at its commit. A replica drops what it holds when notified, and holds nothing while its listening
-- connection is down, so an add, a rotation or a revocation reaches every replica within the notification's delivery.
CREATE FUNCTION sources_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('runledger_sources', TG_TABLE_SCHEMA);
    RETURN NULL;
END $$;

CREATE TRIGGER sources_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON sources
    FOR EACH STATEMENT EXECUTE FUNCTION sources_changed();
CREATE TRIGGER source_secrets_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON source_secrets
    FOR EACH STATEMENT EXECUTE FUNCTION sources_changed();
