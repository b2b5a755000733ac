-- A KEK rotation asks which KEKs wrap the vault's keys (the sharing service refuses to start when
-- one it is not given wraps any), and its sweep walks the keys that another KEK than the current
-- one wraps. One vault row per patient key: building the index holds key writes (a patient's
-- first upload, an erasure) for as long as it takes.
CREATE INDEX patient_keys_kek ON patient_keys (kek_id, key_id);
