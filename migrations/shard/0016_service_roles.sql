-- Each service connects as its own role (libs/pg/database_roles.h), granted only what it does.
-- (As control migration 0006, for a shard.)
-- The role running the migrations owns the schema; no service can alter a table, and none can
-- change, delete or directly insert audit entries: audit_append(), run with its owner's rights,
-- is the only way into the chain.
--
-- The roles are made here when missing (LOGIN, without a password: ops set one, or use
-- certificate authentication); a role that exists already is used as it is, unless it holds more
-- than a service should, which stops the migration.
DO $$
DECLARE
  r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['medgate_routing', 'medgate_consent', 'medgate_ingest', 'medgate_sharing'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
      EXECUTE format('CREATE ROLE %I LOGIN', r);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r
               AND (rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication OR rolbypassrls)) THEN
      RAISE EXCEPTION 'role % is a superuser or may create roles or databases, replicate or bypass row security: a service role may not', r;
    END IF;
    IF pg_has_role(r, current_user, 'USAGE') THEN
      RAISE EXCEPTION 'role % has the rights of %, which owns the schema: a service role may not', r, current_user;
    END IF;
  END LOOP;
END $$;

DO $$
DECLARE
  f text;
BEGIN
  -- Run with their owner's rights, on this schema's tables only: the chain's appenders, and the
  -- partition keeper, which creates tables.
  FOREACH f IN ARRAY ARRAY[
      'audit_append(text, text, text, text, text, text, text, text, text, text, bigint, text, text, bytea, bytea)',
      'audit_append_many(text[], text[], text[], text[], text[], text[], text[], text[], text[], text[], bigint[], text[], text[], bytea[], bytea[])',
      'medgate_ensure_vitals_partitions(int, int)'] LOOP
    EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = %I, pg_temp', f,
                   current_schema());
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
  END LOOP;
END $$;
REVOKE ALL ON FUNCTION medgate_advance_device_cursors(text[], text[], bigint[]) FROM PUBLIC;

-- Consent records grants and revocations as new versions (it locks the consent it versions,
-- which takes UPDATE; the tables' triggers refuse any change or deletion).
GRANT SELECT, INSERT, UPDATE ON consents TO medgate_consent;
GRANT SELECT, INSERT ON consent_versions TO medgate_consent;
-- Ingest and sharing check consents through their caches.
GRANT SELECT ON consents, consent_versions TO medgate_ingest, medgate_sharing;

-- Ingest stores and reads vitals (through the partitioned table) and keeps the device cursors.
GRANT SELECT, INSERT ON vitals TO medgate_ingest;
GRANT SELECT, INSERT, UPDATE ON device_cursors TO medgate_ingest;
GRANT EXECUTE ON FUNCTION medgate_advance_device_cursors(text[], text[], bigint[]),
                          medgate_ensure_vitals_partitions(int, int) TO medgate_ingest;

-- Sharing keeps records, their chunks and keys, grants and the queue of keys to destroy; it reads
-- and verifies the chain as the Audit service.
GRANT SELECT, INSERT, UPDATE, DELETE ON records, record_chunks, record_keys TO medgate_sharing;
GRANT SELECT, INSERT, UPDATE ON share_grants TO medgate_sharing;
GRANT SELECT, INSERT, DELETE ON key_destructions TO medgate_sharing;
GRANT SELECT ON audit_log, audit_head TO medgate_sharing;

GRANT EXECUTE ON FUNCTION audit_append(text, text, text, text, text, text, text, text, text, text,
                                       bigint, text, text, bytea, bytea)
  TO medgate_consent, medgate_ingest, medgate_sharing;
GRANT EXECUTE ON FUNCTION audit_append_many(text[], text[], text[], text[], text[], text[], text[],
                                            text[], text[], text[], bigint[], text[], text[],
                                            bytea[], bytea[])
  TO medgate_ingest, medgate_sharing;
