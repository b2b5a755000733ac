-- Sharing may confirm a patient key and rewrap it under another KEK, never change which key or
-- patient a row is: until now it held UPDATE on every column of patient_keys.
REVOKE UPDATE ON patient_keys FROM medgate_sharing;
GRANT UPDATE (confirmed, kek_id, wrapped_key) ON patient_keys TO medgate_sharing;

-- A service role that belongs to a role without inheriting its rights (NOINHERIT) may still
-- SET ROLE to it, and so has them as much as one that inherits them: the check made when the
-- roles were made (migration 0002) counted inherited rights only. Each service role that exists is
-- refused here if it is a member, in either way, of the role running the migrations, of another
-- service's role, of a predefined role that reads or writes everything or the server's files or
-- owns the database, of any role that is a superuser or may create roles or databases, replicate
-- or bypass row security, or of one that owns objects in this database.
DO $$
DECLARE
  roles text[] := ARRAY['medgate_routing', 'medgate_consent', 'medgate_ingest', 'medgate_sharing'];
  r text;
  other text;
BEGIN
  FOREACH r IN ARRAY roles LOOP
    CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r);
    SELECT o.rolname INTO other FROM pg_roles o
    WHERE o.rolname <> r AND pg_has_role(r, o.oid, 'MEMBER')
      AND (o.rolsuper OR o.rolcreaterole OR o.rolcreatedb OR o.rolreplication OR o.rolbypassrls
           OR o.rolname = current_user OR o.rolname = ANY (array_remove(roles, r))
           OR o.rolname IN ('pg_read_all_data', 'pg_write_all_data', 'pg_read_server_files',
                            'pg_write_server_files', 'pg_execute_server_program',
                            'pg_database_owner')
           OR EXISTS (SELECT 1 FROM pg_class WHERE relowner = o.oid)
           OR EXISTS (SELECT 1 FROM pg_proc WHERE proowner = o.oid)
           OR EXISTS (SELECT 1 FROM pg_namespace WHERE nspowner = o.oid))
    ORDER BY o.rolname LIMIT 1;
    IF other IS NOT NULL THEN
      RAISE EXCEPTION 'role % is a member of % (it may SET ROLE to it, whether or not it inherits its rights): a service role may not', r, other;
    END IF;
  END LOOP;
END $$;
