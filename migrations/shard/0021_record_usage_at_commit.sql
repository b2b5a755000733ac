-- The usage count of migration 0019 is written when the transaction commits, not when its
-- statement ends. An upload's statement takes the audit chain's head (its entry is in the same
-- statement) before its record's insert reaches the count; an erasure's delete reached the count
-- first and took the head in its next statement: an upload and an erasure of one tenant could
-- deadlock. Deferred to the commit, the count comes after the head on every path (each path that
-- writes records appends an entry first or in the same statement).
DROP TRIGGER records_count_usage ON records;
CREATE CONSTRAINT TRIGGER records_count_usage
  AFTER INSERT OR DELETE OR UPDATE OF tenant_id, size_bytes ON records
  DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION medgate_count_record_usage();

-- A count that somehow fell short (records restored with triggers off) must not make an erasure
-- fail its commit: it stops at zero.
CREATE OR REPLACE FUNCTION medgate_count_record_usage() RETURNS trigger
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
