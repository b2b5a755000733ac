-- A patient's data report (Audit.PatientDataReport) asks every shard but the patient's home how
-- many rows name the patient, key destructions among them: found by this index, not a scan.
CREATE INDEX key_destructions_by_patient ON key_destructions (patient_id);
