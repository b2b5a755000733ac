-- Vitals in the patient's home shard, partitioned by measurement month, and per-device cursors
-- that make (tenant, device, seq) unique in storage across partitions.
CREATE TABLE vitals (
  tenant_id   text NOT NULL,
  device_id   text NOT NULL,
  seq         bigint NOT NULL,
  patient_id  text NOT NULL,
  loinc       text NOT NULL,
  value       double precision NOT NULL,
  ucum        text NOT NULL,
  measured_at timestamptz NOT NULL,
  received_at timestamptz NOT NULL DEFAULT now(),
  latitude    double precision,   -- only with GEOLOCATION consent
  longitude   double precision,
  accuracy_m  double precision,
  PRIMARY KEY (tenant_id, device_id, seq, measured_at)
) PARTITION BY RANGE (measured_at);
CREATE INDEX vitals_patient_code_time ON vitals (patient_id, loinc, measured_at);
CREATE TABLE vitals_default PARTITION OF vitals DEFAULT;

-- Creates the monthly partitions from `months_back` before to `months_ahead` after now.
CREATE FUNCTION medgate_ensure_vitals_partitions(months_back int, months_ahead int)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  m date;
  name text;
BEGIN
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
SELECT medgate_ensure_vitals_partitions(2, 12);

-- The highest seq committed per device: a sample at or below it is a duplicate.
CREATE TABLE device_cursors (
  tenant_id  text NOT NULL,
  device_id  text NOT NULL,
  max_seq    bigint NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (tenant_id, device_id)
);
