-- What each tenant's records take in this shard, kept by the records table's own trigger in the
-- transaction that stores or erases a record: an upload's quota check reads one row instead of
-- summing the tenant's records (a vault of archives holds millions of them).
-- Records are not written meanwhile (the lock), so the counts start exact.
LOCK TABLE records IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE tenant_record_usage (
  tenant_id text PRIMARY KEY,
  bytes     bigint NOT NULL CHECK (bytes >= 0)
);
INSERT INTO tenant_record_usage (tenant_id, bytes)
  SELECT tenant_id, sum(size_bytes) FROM records GROUP BY tenant_id;

-- Run with its owner's rights: the sharing service reads the counts and cannot write them. A
-- count that somehow fell short (records restored with triggers off) stops at zero rather than
-- making an erasure fail its commit.
CREATE FUNCTION medgate_count_record_usage() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
  IF TG_OP IN ('UPDATE', 'DELETE') THEN
    UPDATE tenant_record_usage SET bytes = greatest(bytes - OLD.size_bytes, 0)
      WHERE tenant_id = OLD.tenant_id;
  END IF;
  IF TG_OP IN ('INSERT', 'UPDATE') THEN
    INSERT INTO tenant_record_usage AS u (tenant_id, bytes) VALUES (NEW.tenant_id, NEW.size_bytes)
      ON CONFLICT (tenant_id) DO UPDATE SET bytes = u.bytes + EXCLUDED.bytes;
    RETURN NEW;
  END IF;
  RETURN OLD;
END
$$;
REVOKE ALL ON FUNCTION medgate_count_record_usage() FROM PUBLIC;
-- Written when the transaction commits, not when its statement ends: an upload's statement takes
-- the audit chain's head (its entry is in the same statement) before its record would reach the
-- count, and an erasure's delete would reach the count before its next statement takes the head,
-- so an upload and an erasure of one tenant could deadlock. At the commit the count comes after
-- the head on every path (each path that writes records appends an entry first or in the same
-- statement).
CREATE CONSTRAINT TRIGGER records_count_usage
  AFTER INSERT OR DELETE OR UPDATE OF tenant_id, size_bytes ON records
  DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION medgate_count_record_usage();

REVOKE ALL ON tenant_record_usage FROM PUBLIC;
GRANT SELECT ON tenant_record_usage TO medgate_sharing;
