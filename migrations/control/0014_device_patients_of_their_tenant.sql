-- A device feeds patients of its own tenant only. Routing checks it when it assigns a device; the
-- database now holds it too, so that no other path (an operator's statement, a fault) can give a
-- tenant's device another tenant's patient, whose shard would then store the first tenant's
-- samples under the second's patient. (A device without a patient, patient_id NULL, is not
-- checked.) Checked against the rows already there before it is relied on.
ALTER TABLE patients ADD CONSTRAINT patients_of_their_tenant UNIQUE (tenant_id, patient_id);
ALTER TABLE devices ADD CONSTRAINT devices_patient_of_their_tenant
  FOREIGN KEY (tenant_id, patient_id) REFERENCES patients (tenant_id, patient_id) NOT VALID;
ALTER TABLE devices VALIDATE CONSTRAINT devices_patient_of_their_tenant;
