-- What a patient's data report (Audit.PatientDataReport) says of their vitals: how many samples
-- there are and when the first and the last were measured, never a value. The sharing role, which
-- serves the report, may not read vitals: it calls this. STABLE, so it reads in its caller's
-- snapshot (the report is one statement). Walks vitals_patient_code_time.
CREATE FUNCTION medgate_vitals_summary(p_patient text, OUT samples bigint, OUT first_us bigint,
                                       OUT last_us bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
  SELECT count(*), min((extract(epoch FROM measured_at) * 1000000)::bigint),
         max((extract(epoch FROM measured_at) * 1000000)::bigint)
  FROM vitals WHERE patient_id = p_patient
$$;
REVOKE ALL ON FUNCTION medgate_vitals_summary(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION medgate_vitals_summary(text) TO medgate_sharing;
