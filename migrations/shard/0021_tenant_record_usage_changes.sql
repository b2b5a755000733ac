-- The usage counts of 0019 were one row per tenant, updated for every record stored or erased: a
-- tenant's commits queued on that row, and an erasure of a patient's N records updated it N times
-- in one transaction, each update walking the row's earlier versions (seconds for tens of
-- thousands of records). Now each statement that writes records appends one change per tenant it
-- touched, and the sharing service's sweep folds the changes into the counts. A tenant's usage is
-- its count plus its changes not yet folded. Records are not written while the triggers change
-- (the lock): the counts stay exact across the switch.
LOCK TABLE records IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE tenant_record_usage_changes (
  tenant_id text NOT NULL,
  bytes     bigint NOT NULL
);
CREATE INDEX tenant_record_usage_changes_by_tenant ON tenant_record_usage_changes (tenant_id);

DROP TRIGGER records_count_usage ON records;
DROP FUNCTION medgate_count_record_usage();

-- Run with their owner's rights: the sharing service reads the changes and cannot write them.
-- Appending takes no lock that another transaction holds, so the order of an upload's and an
-- erasure's locks no longer matters here.
CREATE FUNCTION medgate_note_records_added() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
  INSERT INTO tenant_record_usage_changes (tenant_id, bytes)
    SELECT tenant_id, sum(size_bytes) FROM added GROUP BY tenant_id;
  RETURN NULL;
END
$$;
CREATE FUNCTION medgate_note_records_removed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
  INSERT INTO tenant_record_usage_changes (tenant_id, bytes)
    SELECT tenant_id, -sum(size_bytes) FROM removed GROUP BY tenant_id;
  RETURN NULL;
END
$$;
CREATE FUNCTION medgate_note_records_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
  INSERT INTO tenant_record_usage_changes (tenant_id, bytes)
    SELECT tenant_id, sum(bytes) FROM (
      SELECT tenant_id, size_bytes AS bytes FROM added
      UNION ALL SELECT tenant_id, -size_bytes FROM removed) AS c
    GROUP BY tenant_id HAVING sum(bytes) <> 0;
  RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION medgate_note_records_added() FROM PUBLIC;
REVOKE ALL ON FUNCTION medgate_note_records_removed() FROM PUBLIC;
REVOKE ALL ON FUNCTION medgate_note_records_changed() FROM PUBLIC;
CREATE TRIGGER records_note_usage_added AFTER INSERT ON records
  REFERENCING NEW TABLE AS added
  FOR EACH STATEMENT EXECUTE FUNCTION medgate_note_records_added();
CREATE TRIGGER records_note_usage_removed AFTER DELETE ON records
  REFERENCING OLD TABLE AS removed
  FOR EACH STATEMENT EXECUTE FUNCTION medgate_note_records_removed();
CREATE TRIGGER records_note_usage_changed AFTER UPDATE ON records
  REFERENCING OLD TABLE AS removed NEW TABLE AS added
  FOR EACH STATEMENT EXECUTE FUNCTION medgate_note_records_changed();

-- Folds every change into the counts, in one transaction: a reader sees either the changes or
-- the counts they went into. One fold at a time (another instance's sweep folds what is left next
-- time); only folds write the counts. A count that somehow fell short (records restored with
-- triggers off) stops at zero. How many changes were folded.
CREATE FUNCTION medgate_fold_record_usage() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
  folded bigint;
BEGIN
  IF NOT pg_try_advisory_xact_lock(hashtextextended('medgate-records-usage-fold', 0)) THEN
    RETURN 0;
  END IF;
  WITH moved AS (DELETE FROM tenant_record_usage_changes RETURNING tenant_id, bytes),
       sums AS (SELECT tenant_id, sum(bytes)::bigint AS bytes, count(*) AS n
                FROM moved GROUP BY tenant_id),
       updated AS (UPDATE tenant_record_usage u SET bytes = greatest(u.bytes + s.bytes, 0)
                   FROM sums s WHERE u.tenant_id = s.tenant_id RETURNING u.tenant_id),
       inserted AS (INSERT INTO tenant_record_usage (tenant_id, bytes)
                    SELECT s.tenant_id, greatest(s.bytes, 0) FROM sums s
                    WHERE NOT EXISTS (SELECT 1 FROM updated d WHERE d.tenant_id = s.tenant_id)
                    RETURNING tenant_id)
  SELECT coalesce(sum(n), 0) INTO folded FROM sums;
  RETURN folded;
END
$$;
REVOKE ALL ON FUNCTION medgate_fold_record_usage() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION medgate_fold_record_usage() TO medgate_sharing;

REVOKE ALL ON tenant_record_usage_changes FROM PUBLIC;
GRANT SELECT ON tenant_record_usage_changes TO medgate_sharing;
