-- An upload's quota check inside its record's own statement. The sharing service used to take the
-- tenant's usage lock and read the usage in two statements of their own, in a transaction opened
-- for them and committed after the record's statement: three more round trips on every upload of
-- a tenant with a quota (every tenant has one by default), about 0.7 ms of a 1 MiB upload's 8.
-- Now the record's statement calls this function first (a one-chunk upload whose patient key is
-- cached is again one statement that commits by itself).
--
-- Takes the tenant's usage lock, held until the transaction ends, then reads the tenant's usage:
-- the count the sweep folded (0019) plus the changes appended since (0021). VOLATILE, so that the
-- read takes a snapshot of its own after the lock is held: it sees every upload of the tenant
-- that committed while this one waited, even though the calling statement's snapshot is older.
-- Two uploads at once cannot both fit into the room that only one of them has. That holds in
-- READ COMMITTED only (in REPEATABLE READ every read would use the transaction's first
-- snapshot), so the function refuses any other isolation level.
-- The wait for the lock now counts towards the record statement's statement_timeout (5 s by
-- default); the lock is held while one record's statement runs, or from a multi-chunk upload's
-- last statement to its commit.
-- Run with the caller's rights: the sharing service reads both tables and takes the lock itself.
CREATE FUNCTION medgate_lock_tenant_usage(p_tenant text) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = public, pg_temp AS $$
BEGIN
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION 'medgate_lock_tenant_usage needs READ COMMITTED, not %',
      current_setting('transaction_isolation');
  END IF;
  PERFORM pg_advisory_xact_lock(hashtextextended('medgate-records-usage:' || p_tenant, 0));
  RETURN coalesce((SELECT bytes FROM tenant_record_usage WHERE tenant_id = p_tenant), 0) +
         coalesce((SELECT sum(bytes) FROM tenant_record_usage_changes WHERE tenant_id = p_tenant), 0);
END
$$;
REVOKE ALL ON FUNCTION medgate_lock_tenant_usage(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION medgate_lock_tenant_usage(text) TO medgate_sharing;
