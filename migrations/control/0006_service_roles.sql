-- Each service connects as its own role (libs/pg/database_roles.h), granted only what it does.
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
BEGIN
  -- Run with its owner's rights, on this schema's tables only.
  EXECUTE format('ALTER FUNCTION audit_append(text, text, text, text, text, text, text, text, '
                 'text, text, bigint, text, text, bytea, bytea) '
                 'SECURITY DEFINER SET search_path = %I, pg_temp', current_schema());
END $$;
REVOKE ALL ON FUNCTION audit_append(text, text, text, text, text, text, text, text, text, text,
                                    bigint, text, text, bytea, bytea) FROM PUBLIC;

-- Routing keeps tenants, residency rules, patients' placement and devices' assignment (it locks
-- the rule and device rows it replaces, which takes UPDATE).
GRANT SELECT, INSERT, UPDATE ON tenants, residency_rules, devices TO medgate_routing;
GRANT SELECT, INSERT ON patients TO medgate_routing;
-- Sharing reads tenants' territories; as the Audit service it reads and verifies the chain.
GRANT SELECT ON tenants, audit_log, audit_head TO medgate_sharing;
GRANT EXECUTE ON FUNCTION audit_append(text, text, text, text, text, text, text, text, text, text,
                                       bigint, text, text, bytea, bytea)
  TO medgate_routing, medgate_sharing;
