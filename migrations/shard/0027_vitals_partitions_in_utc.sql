-- Vitals partitions are calendar months in UTC, whatever the server's or the session's time zone.
-- 0003 made the first months in the migration's session time zone (the server's default, which
-- initdb takes from the host) and the partition keeper in the ingest service's (UTC): on a server
-- west of UTC the keeper's months overlapped the first ones and it failed for good once those ran
-- out; east of UTC a gap between them filed an hour or two of samples in vitals_default.
-- The keeper now runs in UTC, and a month it makes starts where the month before it ends and ends
-- where the month after it starts, when those exist (made earlier in another time zone): the
-- partitions stay contiguous. (Migrations now run in UTC too: libs/migrate.)
CREATE OR REPLACE FUNCTION medgate_ensure_vitals_partitions(months_back int, months_ahead int)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
SET TimeZone = 'UTC' AS $$
DECLARE
  m date;
  name text;
  lo timestamptz;
  hi timestamptz;
  bound text;
BEGIN
  IF months_back NOT BETWEEN 0 AND 24 OR months_ahead NOT BETWEEN 0 AND 24 THEN
    RAISE EXCEPTION 'medgate_ensure_vitals_partitions: months_back and months_ahead must be 0 to 24, got % and %',
      months_back, months_ahead;
  END IF;
  PERFORM pg_advisory_xact_lock(hashtext('medgate_ensure_vitals_partitions'));
  FOR i IN -months_back..months_ahead LOOP
    m := (date_trunc('month', now()) + make_interval(months => i))::date;
    name := 'vitals_' || to_char(m, 'YYYY_MM');
    IF to_regclass(name) IS NULL THEN
      lo := m::timestamptz;
      hi := (m + interval '1 month')::timestamptz;
      -- Where the neighbouring months' partitions end and start (printed in UTC here).
      SELECT substring(pg_get_expr(c.relpartbound, c.oid) FROM $r$TO \('([^']+)'\)$r$) INTO bound
      FROM pg_class c
      WHERE c.oid = to_regclass('vitals_' || to_char(m - interval '1 month', 'YYYY_MM'));
      IF bound IS NOT NULL THEN
        lo := bound::timestamptz;
      END IF;
      bound := NULL;
      SELECT substring(pg_get_expr(c.relpartbound, c.oid) FROM $r$FROM \('([^']+)'\)$r$) INTO bound
      FROM pg_class c
      WHERE c.oid = to_regclass('vitals_' || to_char(m + interval '1 month', 'YYYY_MM'));
      IF bound IS NOT NULL THEN
        hi := bound::timestamptz;
      END IF;
      bound := NULL;
      IF lo < hi THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF vitals FOR VALUES FROM (%L) TO (%L)',
                       name, lo, hi);
      END IF;
    END IF;
  END LOOP;
END;
$$;
