-- Audit.QueryAudit reads the control log (tenants, placements, devices) for ops, and a patient's
-- part of it, for a time range. As shard migration 0022 does for the shards' logs: through the
-- index on (patient_id, seq), or in seq order for the whole log, a range near the end of a long
-- log read everything before it, page after page. The query now goes in (at_us, seq) order, the
-- log's order unless the clock was set back, and these indexes find a range's first entry
-- directly: a patient's, and the whole log's for ops.
--
-- Building them holds appends to the log (and so every audited write) until they are built. On a
-- large log, build them beforehand without blocking writes, as the migrations' role; this
-- migration then keeps them (and stops if one is not valid, or not as below):
--   CREATE INDEX CONCURRENTLY audit_log_patient_time ON audit_log (patient_id, at_us, seq)
--     WHERE patient_id <> '';
--   CREATE INDEX CONCURRENTLY audit_log_time ON audit_log (at_us, seq);
SET LOCAL lock_timeout = '30s';
DO $$
DECLARE
  wanted text[] := ARRAY[
    'audit_log_patient_time', 'USING btree (patient_id, at_us, seq) WHERE (patient_id <> ''''::text)',
    'audit_log_time', 'USING btree (at_us, seq)'];
  ix record;
BEGIN
  -- Built here only when missing: a CREATE INDEX, even IF NOT EXISTS, first waits for its lock.
  IF to_regclass('audit_log_patient_time') IS NULL THEN
    CREATE INDEX audit_log_patient_time ON audit_log (patient_id, at_us, seq)
      WHERE patient_id <> '';
  END IF;
  IF to_regclass('audit_log_time') IS NULL THEN
    CREATE INDEX audit_log_time ON audit_log (at_us, seq);
  END IF;
  -- An index built beforehand by a CREATE INDEX CONCURRENTLY that failed, or still runs, is not
  -- valid: nothing reads it, yet every append writes it. One not as above would not serve.
  FOR i IN 1..array_length(wanted, 1) BY 2 LOOP
    SELECT x.indisvalid AND x.indisready AS usable, pg_get_indexdef(x.indexrelid) AS definition
      INTO ix
      FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid
     WHERE c.relname = wanted[i] AND x.indrelid = 'audit_log'::regclass;
    IF NOT FOUND OR NOT ix.usable OR NOT ix.definition LIKE '%' || wanted[i + 1] THEN
      RAISE EXCEPTION 'index % on audit_log is not valid, or not as this migration builds it '
                      '(%): drop it (DROP INDEX CONCURRENTLY %) and run the migrations again',
                      wanted[i], coalesce(ix.definition, 'missing'), wanted[i];
    END IF;
  END LOOP;
END
$$;
-- Every append writes every index of the log (ingest appends an entry per batch of vitals): the
-- index on (patient_id, seq), replaced by the first one above, goes, and so does the one on
-- (tenant, seq), which no query reads. A version before this one (a rolling upgrade, a rollback)
-- still answers its patient queries, through the new index and a sort of the patient's entries.
DROP INDEX audit_log_patient;
DROP INDEX audit_log_tenant;
