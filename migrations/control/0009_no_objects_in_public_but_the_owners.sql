-- Only the schema's owner creates objects in public. PostgreSQL 15 gives a new database's public
-- schema no CREATE for PUBLIC, but a database upgraded from an older server keeps it, and a grant
-- may add it back. A service role that could create a function or an operator in public would
-- have it chosen, as a closer match than pg_catalog's, inside the functions that run with the
-- owner's rights (the audit chain's, the partition keeper), and its code would run as the owner:
-- able to rewrite the audit log. So CREATE is revoked from PUBLIC and from every service role,
-- and a service role that still has it (through a role it belongs to) stops the migration.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
DO $$
DECLARE
  roles text[] := ARRAY['medgate_routing', 'medgate_consent', 'medgate_ingest', 'medgate_sharing'];
  r text;
BEGIN
  FOREACH r IN ARRAY roles LOOP
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
      EXECUTE format('REVOKE CREATE ON SCHEMA public FROM %I', r);
      IF has_schema_privilege(r, 'public', 'CREATE') THEN
        RAISE EXCEPTION 'role % may create objects in schema public of database % (through a role it belongs to): a service role may not', r, current_database();
      END IF;
    END IF;
  END LOOP;
END $$;
