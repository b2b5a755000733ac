-- The ingest service keeps the monthly vitals partitions ahead of time: at start and every
-- ingest.partition_check_minutes. Replicas doing it at the same moment take turns, so none fails
-- creating a partition another has just created.
CREATE OR REPLACE FUNCTION medgate_ensure_vitals_partitions(months_back int, months_ahead int)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  m date;
  name text;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtext('medgate_ensure_vitals_partitions'));
  FOR i IN -months_back..months_ahead LOOP
    m := (date_trunc('month', now()) + make_interval(months => i))::date;
    name := 'vitals_' || to_char(m, 'YYYY_MM');
    IF to_regclass(name) IS NULL THEN
      EXECUTE format('CREATE TABLE %I PARTITION OF vitals FOR VALUES FROM (%L) TO (%L)',
                     name, m, (m + interval '1 month')::date);
    END IF;
  END LOOP;
END;
$$;
