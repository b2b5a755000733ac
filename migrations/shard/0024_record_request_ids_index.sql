-- One record per practitioner and request id (migration 0023). Building the index holds the
-- writes to records (uploads, archiving, erasures; reads go on) until it is built. On a large
-- table, build it beforehand without blocking writes, as the migrations' role (the column first:
-- migration 0023 then keeps it); this migration then keeps the index, and stops if it is not
-- valid, or not as below:
--   ALTER TABLE records ADD COLUMN IF NOT EXISTS request_id text NOT NULL DEFAULT '';
--   CREATE UNIQUE INDEX CONCURRENTLY records_owner_request ON records (owner, request_id)
--     WHERE request_id <> '';
-- Until it exists, uploads of the same request id at once, and retries of one-chunk uploads,
-- may each store a record (and the index's build then fails, naming them).
SET LOCAL lock_timeout = '30s';
DO $$
DECLARE
  ix record;
BEGIN
  -- Built here only when missing: a CREATE INDEX, even IF NOT EXISTS, first waits for its lock.
  IF to_regclass('records_owner_request') IS NULL THEN
    CREATE UNIQUE INDEX records_owner_request ON records (owner, request_id)
      WHERE request_id <> '';
  END IF;
  -- One built beforehand by a CREATE INDEX CONCURRENTLY that failed, or still runs, is not valid
  -- (it enforces nothing); one not as above would not serve.
  SELECT x.indisvalid AND x.indisready AS usable, pg_get_indexdef(x.indexrelid) AS definition
    INTO ix
    FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid
   WHERE c.relname = 'records_owner_request' AND x.indrelid = 'records'::regclass;
  IF NOT FOUND OR NOT ix.usable OR NOT ix.definition LIKE
      '%UNIQUE INDEX records_owner_request ON %records USING btree (owner, request_id) WHERE (request_id <> ''''::text)' THEN
    RAISE EXCEPTION 'index records_owner_request on records is not valid, or not as this migration '
                    'builds it (%): drop it (DROP INDEX CONCURRENTLY records_owner_request) and '
                    'run the migrations again', coalesce(ix.definition, 'missing');
  END IF;
END
$$;
