-- Patient keys move to the region's key vault (migrations/vault): the shard keeps, for each, a row
-- in record_keys with wrapped_by = 'vault' and no key material, which uploads and erasures lock.
-- Rows written before keep their KEK-wrapped key until the sharing service moves it to the vault.
--
-- The keys an erasure retired, to be deleted from the vault once the erasure has committed here:
-- written in the erasure's transaction, removed once the vault confirms the deletion (retried by
-- the sharing service's sweep until it does).
CREATE TABLE key_destructions (
  key_id       text PRIMARY KEY,
  patient_id   text NOT NULL,
  requested_at timestamptz NOT NULL DEFAULT now()
);
