-- The sharing service records every audit log's chain head in the other logs (AuditCore::
-- RecordAnchors): the shards' heads here, this log's head in each shard. An anchor is an entry
-- of object_type 'audit_anchor' naming the anchored log; VerifyChain checks a log against the
-- latest one recorded elsewhere, so a log cut short or rewritten by someone able to write only
-- its own database is caught without an anchor kept by hand. This index finds the latest.
--
-- Building it holds appends to the log until it is built (a scan of the whole log). On a large
-- log, build it beforehand without blocking writes, as the migrations' role; this migration then
-- keeps it (and stops if it is not valid, or not as below):
--   CREATE INDEX CONCURRENTLY audit_log_anchors ON audit_log (object_id, seq)
--     WHERE object_type = 'audit_anchor';
SET LOCAL lock_timeout = '30s';
DO $$
DECLARE
  ix record;
BEGIN
  IF to_regclass('audit_log_anchors') IS NULL THEN
    CREATE INDEX audit_log_anchors ON audit_log (object_id, seq)
      WHERE object_type = 'audit_anchor';
  END IF;
  SELECT x.indisvalid AND x.indisready AS usable, pg_get_indexdef(x.indexrelid) AS definition
    INTO ix
    FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid
   WHERE c.relname = 'audit_log_anchors' AND x.indrelid = 'audit_log'::regclass;
  IF NOT FOUND OR NOT ix.usable OR NOT ix.definition LIKE
      '%USING btree (object_id, seq) WHERE (object_type = ''audit_anchor''::text)' THEN
    RAISE EXCEPTION 'index audit_log_anchors on audit_log is not valid, or not as this migration '
                    'builds it (%): drop it (DROP INDEX CONCURRENTLY audit_log_anchors) and run '
                    'the migrations again', coalesce(ix.definition, 'missing');
  END IF;
END
$$;
