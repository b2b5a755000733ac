-- Each service connects as its own role (libs/pg/database_roles.h), granted only what it does.
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

-- The chain's function: run with its owner's rights, on this schema only; called by the roles
-- whose service appends here.
ALTER FUNCTION audit_append(text, text, text, text, text, text, text, text, text, text, bigint,
                            text, text, bytea, bytea)
  SECURITY DEFINER SET search_path = public, pg_temp;
REVOKE ALL ON FUNCTION audit_append(text, text, text, text, text, text, text, text, text, text,
                                    bigint, text, text, bytea, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit_append(text, text, text, text, text, text, text, text, text, text,
                                       bigint, text, text, bytea, bytea)
  TO medgate_routing, medgate_sharing;

-- A residency rule is never changed: a new version is added. (Routing locks the current version
-- when it adds one, which takes UPDATE.)
CREATE FUNCTION residency_rules_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'residency_rules is append-only: % refused', TG_OP;
END;
$$;
CREATE TRIGGER residency_rules_no_update BEFORE UPDATE OR DELETE ON residency_rules
  FOR EACH ROW EXECUTE FUNCTION residency_rules_append_only();
CREATE TRIGGER residency_rules_no_truncate BEFORE TRUNCATE ON residency_rules
  FOR EACH STATEMENT EXECUTE FUNCTION residency_rules_append_only();

-- Routing keeps tenants, residency rules, patients' placement and devices' assignment (it locks
-- the rule and device rows it replaces).
GRANT SELECT, INSERT, UPDATE ON tenants, residency_rules, devices TO medgate_routing;
GRANT SELECT, INSERT ON patients TO medgate_routing;
-- Sharing reads tenants' territories (not their pseudonym keys); as the Audit service it reads
-- and verifies the chain.
GRANT SELECT (tenant_id, territories, active) ON tenants TO medgate_sharing;
GRANT SELECT ON audit_log, audit_head TO medgate_sharing;
