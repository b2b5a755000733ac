-- When each device's latest assignment began. Ingest refuses samples measured before the current
-- assignment: a device's buffered samples from a former patient, or from while it fed nobody, are
-- not the current patient's. It is kept through an unassignment, so that a device given back to
-- the patient it last fed continues that assignment. Devices assigned before this migration take
-- the time of their last change, which for an assigned device is its assignment.
ALTER TABLE devices ADD COLUMN assigned_at timestamptz;
UPDATE devices SET assigned_at = updated_at WHERE patient_id IS NOT NULL;
