-- Each service connects as its own role (libs/pg/database_roles.h), granted only what it does.
-- (As control migration 0006, for a key vault.)
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

-- Only sharing opens the patients' data keys: it writes, reads, confirms and destroys them.
GRANT SELECT, INSERT, UPDATE, DELETE ON patient_keys TO medgate_sharing;
