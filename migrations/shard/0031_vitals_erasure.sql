-- Erasure of a patient's vitals (DeviceIngest.EraseVitals, GDPR art. 17). The ingest role may
-- not delete from vitals: this function deletes the earliest samples of one code of one patient
-- of one tenant, at most `max_rows` of them and those measured at the same instant as the last,
-- and answers how many it deleted. Its caller appends the audit entry of what it deleted in the
-- same transaction. Both statements walk vitals_patient_code_time.
CREATE FUNCTION medgate_erase_vitals(p_tenant text, p_patient text, p_loinc text, max_rows int)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
  last_at timestamptz;
  n bigint;
BEGIN
  IF max_rows IS NULL OR max_rows < 1 OR max_rows > 100000 THEN
    RAISE EXCEPTION 'medgate_erase_vitals: max_rows must be 1 to 100000, got %', max_rows;
  END IF;
  SELECT measured_at INTO last_at FROM vitals
  WHERE patient_id = p_patient AND loinc = p_loinc AND tenant_id = p_tenant
  ORDER BY measured_at OFFSET max_rows - 1 LIMIT 1;
  IF last_at IS NULL THEN
    -- Fewer than max_rows left: all of them.
    DELETE FROM vitals WHERE patient_id = p_patient AND loinc = p_loinc AND tenant_id = p_tenant;
  ELSE
    DELETE FROM vitals WHERE patient_id = p_patient AND loinc = p_loinc AND tenant_id = p_tenant
      AND measured_at <= last_at;
  END IF;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END;
$$;
REVOKE ALL ON FUNCTION medgate_erase_vitals(text, text, text, int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION medgate_erase_vitals(text, text, text, int) TO medgate_ingest;
