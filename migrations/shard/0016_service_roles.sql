-- Each service connects as its own role (libs/pg/database_roles.h), granted only what it does.
-- (As control migration 0006, for a shard.)
-- The role running the migrations owns the schema (public); no service can alter a table, and
-- none can change, delete or directly insert audit entries: the chain's functions, run with their
-- owner's rights, are the only way into it.
--
-- The roles are made here when missing (LOGIN, without a password: ops set one, or use
-- certificate authentication). One that exists already is refused if it could do more than its
-- grants: a superuser, a role that may create roles or databases, replicate or bypass row
-- security, one holding the rights of the owner, of another service's role or of a predefined
-- role that reads or writes everything or the server's files, or one owning objects here. Then
-- every right it holds here is revoked before it gets its own, so the grants below are all it has.
DO $$
DECLARE
  roles text[] := ARRAY['medgate_routing', 'medgate_consent', 'medgate_ingest', 'medgate_sharing'];
  r text;
  other text;
BEGIN
  FOREACH r IN ARRAY roles LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
      EXECUTE format('CREATE ROLE %I LOGIN', r);
    END IF;
  END LOOP;
  FOREACH r IN ARRAY roles LOOP
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r
               AND (rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication OR rolbypassrls)) THEN
      RAISE EXCEPTION 'role % is a superuser or may create roles or databases, replicate or bypass row security: a service role may not', r;
    END IF;
    FOREACH other IN ARRAY array_cat(ARRAY[current_user::text, 'pg_read_all_data',
        'pg_write_all_data', 'pg_read_server_files', 'pg_write_server_files',
        'pg_execute_server_program'], array_remove(roles, r)) LOOP
      IF pg_has_role(r, other, 'USAGE') THEN
        RAISE EXCEPTION 'role % has the rights of %: a service role may not', r, other;
      END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_class WHERE relowner = r::regrole)
       OR EXISTS (SELECT 1 FROM pg_proc WHERE proowner = r::regrole)
       OR EXISTS (SELECT 1 FROM pg_namespace WHERE nspowner = r::regrole)
       OR EXISTS (SELECT 1 FROM pg_type WHERE typowner = r::regrole) THEN
      RAISE EXCEPTION 'role % owns objects in database %: a service role may not', r, current_database();
    END IF;
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA public FROM %I', r);
    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM %I', r);
    EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM %I', r);
  END LOOP;
END $$;

-- The partition keeper, bounded: ingest's role may make the partitions of two years around now,
-- not any number of tables.
CREATE OR REPLACE FUNCTION medgate_ensure_vitals_partitions(months_back int, months_ahead int)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
  m date;
  name text;
BEGIN
  IF months_back NOT BETWEEN 0 AND 24 OR months_ahead NOT BETWEEN 0 AND 24 THEN
    RAISE EXCEPTION 'medgate_ensure_vitals_partitions: months_back and months_ahead must be 0 to 24, got % and %',
      months_back, months_ahead;
  END IF;
  PERFORM pg_advisory_xact_lock(hashtext('medgate_ensure_vitals_partitions'));
  FOR i IN -months_back..months_ahead LOOP
    m := (date_trunc('month', now()) + make_interval(months => i))::date;
    name := 'vitals_' || to_char(m, 'YYYY_MM');
    IF to_regclass(name) IS NULL THEN
      EXECUTE format('CREATE TABLE %I PARTITION OF vitals FOR VALUES FROM (%L) TO (%L)',
                     name, m, (m + interval '1 month')::date);
    END IF;
  END LOOP;
END;
$$;

-- The chain's functions: run with their owner's rights, on this schema only. A migration that
-- replaces one of these functions must say SECURITY DEFINER and SET search_path again
-- (CREATE OR REPLACE resets them; database_roles_test checks them).
ALTER FUNCTION audit_append(text, text, text, text, text, text, text, text, text, text, bigint,
                            text, text, bytea, bytea)
  SECURITY DEFINER SET search_path = public, pg_temp;
ALTER FUNCTION audit_append_many(text[], text[], text[], text[], text[], text[], text[], text[],
                                 text[], text[], bigint[], text[], text[], bytea[], bytea[])
  SECURITY DEFINER SET search_path = public, pg_temp;
REVOKE ALL ON FUNCTION
  audit_append(text, text, text, text, text, text, text, text, text, text, bigint, text, text,
               bytea, bytea),
  audit_append_many(text[], text[], text[], text[], text[], text[], text[], text[], text[],
                    text[], bigint[], text[], text[], bytea[], bytea[]),
  medgate_ensure_vitals_partitions(int, int),
  medgate_advance_device_cursors(text[], text[], bigint[])
  FROM PUBLIC;

-- Consent records grants and revocations as new versions (it locks the consent it versions,
-- which takes UPDATE; the tables' triggers refuse any change or deletion).
GRANT SELECT, INSERT, UPDATE ON consents TO medgate_consent;
GRANT SELECT, INSERT ON consent_versions TO medgate_consent;
-- Ingest and sharing check consents through their caches.
GRANT SELECT ON consents, consent_versions TO medgate_ingest, medgate_sharing;

-- Ingest stores and reads vitals (through the partitioned table) and keeps the device cursors
-- (medgate_advance_device_cursors runs with its caller's rights).
GRANT SELECT, INSERT ON vitals TO medgate_ingest;
GRANT SELECT, INSERT, UPDATE ON device_cursors TO medgate_ingest;
GRANT EXECUTE ON FUNCTION medgate_advance_device_cursors(text[], text[], bigint[]),
                          medgate_ensure_vitals_partitions(int, int) TO medgate_ingest;

-- Sharing keeps records, their chunks and keys, grants and the queue of keys to destroy (it
-- locks the rows it changes, which takes UPDATE); it reads and verifies the chain as the Audit
-- service.
GRANT SELECT, INSERT, UPDATE, DELETE ON records, record_keys TO medgate_sharing;
GRANT SELECT, INSERT, DELETE ON record_chunks, key_destructions TO medgate_sharing;
GRANT SELECT, INSERT, UPDATE ON share_grants TO medgate_sharing;
GRANT SELECT ON audit_log, audit_head TO medgate_sharing;

GRANT EXECUTE ON FUNCTION audit_append(text, text, text, text, text, text, text, text, text, text,
                                       bigint, text, text, bytea, bytea)
  TO medgate_consent, medgate_ingest, medgate_sharing;
GRANT EXECUTE ON FUNCTION audit_append_many(text[], text[], text[], text[], text[], text[], text[],
                                            text[], text[], text[], bigint[], text[], text[],
                                            bytea[], bytea[])
  TO medgate_ingest, medgate_sharing;
