-- An upsert whose narrowing drops regions counts the tenant's patients in them (they stay there:
-- routing refuses it unless ops keep them there knowingly). This index finds each dropped region's
-- patients of the tenant directly, and serves whatever the index on tenant_id alone served, which
-- goes: a placement writes one index less.
--
-- Building it holds placements (inserts into patients) until it is built, and dropping the old
-- index takes the table's lock for a moment (after every transaction using the table ends). On a
-- large or busy directory, do both beforehand without blocking, as the migrations' role; this
-- migration then keeps the new index (and stops if it is not valid, or not as below):
--   CREATE INDEX CONCURRENTLY patients_tenant_region ON patients (tenant_id, region_id);
--   DROP INDEX CONCURRENTLY patients_tenant;
SET LOCAL lock_timeout = '30s';
DO $$
DECLARE
  ix record;
BEGIN
  -- Built here only when missing: a CREATE INDEX, even IF NOT EXISTS, first waits for its lock.
  IF to_regclass('patients_tenant_region') IS NULL THEN
    CREATE INDEX patients_tenant_region ON patients (tenant_id, region_id);
  END IF;
  -- One built beforehand by a CREATE INDEX CONCURRENTLY that failed, or still runs, is not valid.
  SELECT x.indisvalid AND x.indisready AS usable, pg_get_indexdef(x.indexrelid) AS definition
    INTO ix
    FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid
   WHERE c.relname = 'patients_tenant_region' AND x.indrelid = 'patients'::regclass;
  IF NOT FOUND OR NOT ix.usable OR NOT ix.definition LIKE '%USING btree (tenant_id, region_id)' THEN
    RAISE EXCEPTION 'index patients_tenant_region on patients is not valid, or not as this '
                    'migration builds it (%): drop it (DROP INDEX CONCURRENTLY '
                    'patients_tenant_region) and run the migrations again',
                    coalesce(ix.definition, 'missing');
  END IF;
END
$$;
DROP INDEX IF EXISTS patients_tenant;
