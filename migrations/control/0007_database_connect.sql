-- Only the services that use the control database may connect to it: routing and sharing
-- (PUBLIC may connect to any database by default), and none may make temporary tables in it.
-- The role running the migrations must own the database (or be a superuser), since a GRANT or
-- REVOKE by anyone else changes nothing: otherwise this migration stops, saying so.
DO $$
DECLARE
  roles text[] := ARRAY['medgate_routing', 'medgate_consent', 'medgate_ingest', 'medgate_sharing'];
  allowed text[] := ARRAY['medgate_routing', 'medgate_sharing'];
  r text;
BEGIN
  EXECUTE format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
  FOREACH r IN ARRAY roles LOOP
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM %I', current_database(), r);
    IF r = ANY (allowed) THEN
      EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), r);
    END IF;
  END LOOP;
  FOREACH r IN ARRAY roles LOOP
    IF has_database_privilege(r, current_database(), 'TEMPORARY')
       OR has_database_privilege(r, current_database(), 'CONNECT') <> (r = ANY (allowed)) THEN
      RAISE EXCEPTION 'database %: role %''s right to connect or make temporary tables could not be set: the role running the migrations (%) must own the database', current_database(), r, current_user;
    END IF;
  END LOOP;
END $$;
