-- Each service connects as its own role (libs/pg/database_roles.h), granted only what it does.
-- (As control migration 0006, for a key vault.) The role running the migrations owns the schema
-- (public); no service can alter a table.
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

-- Only sharing opens the patients' data keys: it writes, reads, confirms and destroys them.
GRANT SELECT, INSERT, UPDATE, DELETE ON patient_keys TO medgate_sharing;
