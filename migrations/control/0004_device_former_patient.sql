-- An unassigned device remembers the patient it fed until its next assignment: services may still
-- hold that assignment in their caches for a while, so routing waits before giving the device to
-- another patient (routing.device_reassign_wait_seconds).
ALTER TABLE devices ADD COLUMN former_patient_id text;
