-- Audit.QueryAudit reads the control log (tenants, placements, devices) for ops, and a patient's
-- part of it, for a time range. As shard migration 0022 does for the shards' logs: through the
-- index on (patient_id, seq), or in seq order for the whole log, a range near the end of a long
-- log read everything before it, page after page. The query now goes in (at_us, seq) order, the
-- log's order unless the clock was set back, and these indexes find a range's first entry
-- directly: a patient's, and the whole log's for ops.
--
-- Building them holds appends to the log (and so every audited write) until they are built. On a
-- large log, build them beforehand without blocking writes, as the migrations' role, and check
-- that both are valid (pg_index.indisvalid) before running this migration, which then keeps them:
--   CREATE INDEX CONCURRENTLY audit_log_patient_time ON audit_log (patient_id, at_us, seq)
--     WHERE patient_id <> '';
--   CREATE INDEX CONCURRENTLY audit_log_time ON audit_log (at_us, seq);
SET LOCAL lock_timeout = '30s';
CREATE INDEX IF NOT EXISTS audit_log_patient_time ON audit_log (patient_id, at_us, seq)
  WHERE patient_id <> '';
CREATE INDEX IF NOT EXISTS audit_log_time ON audit_log (at_us, seq);
-- The index on (patient_id, seq) stays while a version before this one may run (a rolling
-- upgrade, a rollback): its queries read it.
