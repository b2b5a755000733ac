-- A region's key vault: the patients' data keys, each wrapped by the key-encryption key (KEK).
-- It is a database apart from the region's shard, with its own backups and their own (short)
-- retention: the shard and its backups hold only ciphertext and record keys wrapped under these
-- keys. Deleting a row here crypto-shreds what its key protected, in the shard's backups too.
CREATE TABLE patient_keys (
  key_id      text PRIMARY KEY,      -- as the shard's record_keys row that names it
  patient_id  text NOT NULL,
  kek_id      text NOT NULL,         -- the KEK that wraps it
  wrapped_key bytea NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now(),
  -- Set once the shard was seen to use the key. A key written for a shard transaction that then
  -- did not commit is deleted by the sharing service's sweep after a grace period.
  confirmed   boolean NOT NULL DEFAULT false
);
CREATE INDEX patient_keys_unconfirmed ON patient_keys (created_at) WHERE NOT confirmed;
