-- Changes that narrow where patients are placed count the patients in the regions they drop
-- (those stay there: routing refuses the change unless ops keep them there knowingly): a rule put
-- counts its territory's, through (territory, region_id); a tenant upsert its tenant's, through
-- (tenant_id, region_id), which also serves whatever the index on tenant_id alone served, so that
-- one goes and a placement writes one index less.
--
-- Building them holds placements (inserts into patients) until they are built, and dropping the
-- old index takes the table's lock for a moment. On a large or busy directory, do all three
-- beforehand without blocking, as the migrations' role; this migration then keeps the new indexes
-- (and stops if one is not valid, or not as below):
--   CREATE INDEX CONCURRENTLY patients_territory_region ON patients (territory, region_id);
--   CREATE INDEX CONCURRENTLY patients_tenant_region ON patients (tenant_id, region_id);
--   DROP INDEX CONCURRENTLY patients_tenant;
SET LOCAL lock_timeout = '30s';
DO $$
DECLARE
  wanted text[] := ARRAY[
    'patients_territory_region', 'USING btree (territory, region_id)',
    'patients_tenant_region', 'USING btree (tenant_id, region_id)'];
  ix record;
BEGIN
  -- Built here only when missing: a CREATE INDEX, even IF NOT EXISTS, first waits for its lock.
  IF to_regclass('patients_territory_region') IS NULL THEN
    CREATE INDEX patients_territory_region ON patients (territory, region_id);
  END IF;
  IF to_regclass('patients_tenant_region') IS NULL THEN
    CREATE INDEX patients_tenant_region ON patients (tenant_id, region_id);
  END IF;
  -- One built beforehand by a CREATE INDEX CONCURRENTLY that failed, or still runs, is not valid.
  FOR i IN 1..array_length(wanted, 1) BY 2 LOOP
    SELECT x.indisvalid AND x.indisready AS usable, pg_get_indexdef(x.indexrelid) AS definition
      INTO ix
      FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid
     WHERE c.relname = wanted[i] AND x.indrelid = 'patients'::regclass;
    IF NOT FOUND OR NOT ix.usable OR NOT ix.definition LIKE '%' || wanted[i + 1] THEN
      RAISE EXCEPTION 'index % on patients is not valid, or not as this migration builds it '
                      '(%): drop it (DROP INDEX CONCURRENTLY %) and run the migrations again',
                      wanted[i], coalesce(ix.definition, 'missing'), wanted[i];
    END IF;
  END LOOP;
END
$$;
DROP INDEX IF EXISTS patients_tenant;
