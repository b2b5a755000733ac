-- A rule put that drops regions counts the patients of its territory that live in them (they stay
-- there: routing refuses the put unless ops keep them there knowingly). This index finds each
-- dropped region's patients directly.
--
-- Building it holds placements (inserts into patients) until it is built. On a large directory,
-- build it beforehand without blocking them, as the migrations' role; this migration then keeps it
-- (and stops if it is not valid, or not as below):
--   CREATE INDEX CONCURRENTLY patients_territory_region ON patients (territory, region_id);
SET LOCAL lock_timeout = '30s';
DO $$
DECLARE
  ix record;
BEGIN
  -- Built here only when missing: a CREATE INDEX, even IF NOT EXISTS, first waits for its lock.
  IF to_regclass('patients_territory_region') IS NULL THEN
    CREATE INDEX patients_territory_region ON patients (territory, region_id);
  END IF;
  -- One built beforehand by a CREATE INDEX CONCURRENTLY that failed, or still runs, is not valid.
  SELECT x.indisvalid AND x.indisready AS usable, pg_get_indexdef(x.indexrelid) AS definition
    INTO ix
    FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid
   WHERE c.relname = 'patients_territory_region' AND x.indrelid = 'patients'::regclass;
  IF NOT FOUND OR NOT ix.usable OR NOT ix.definition LIKE '%USING btree (territory, region_id)' THEN
    RAISE EXCEPTION 'index patients_territory_region on patients is not valid, or not as this '
                    'migration builds it (%): drop it (DROP INDEX CONCURRENTLY '
                    'patients_territory_region) and run the migrations again',
                    coalesce(ix.definition, 'missing');
  END IF;
END
$$;
