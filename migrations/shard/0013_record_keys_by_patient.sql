-- An erasure reads the record keys of one patient under one patient key, to rewrap them (the
-- sharing service's ShredRecordKey): by patient, not by a scan of every record key.
CREATE INDEX record_keys_by_patient ON record_keys (patient_id, wrapped_by) WHERE record_id IS NOT NULL;
