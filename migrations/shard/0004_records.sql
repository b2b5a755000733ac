-- Records of a shard's patients: encrypted content in chunks, wrapped data keys, share grants.

-- Data keys, stored only wrapped. Each patient has one patient key (random 256-bit) wrapped by the
-- key-encryption key; each record has a record key (random 256-bit) wrapped by its patient's key.
-- Deleting a row crypto-shreds what it protected: a record key for one record, the patient key for
-- every record of the patient (GDPR art. 17).
CREATE TABLE record_keys (
  key_id      text PRIMARY KEY,
  patient_id  text NOT NULL,
  record_id   text,                  -- NULL for the patient key
  wrapped_by  text NOT NULL,         -- KEK id (patient key) or the patient key's key_id
  wrapped_key bytea NOT NULL,
  created_at  timestamptz NOT NULL
);
CREATE UNIQUE INDEX record_keys_one_per_patient ON record_keys (patient_id) WHERE record_id IS NULL;
CREATE UNIQUE INDEX record_keys_one_per_record ON record_keys (record_id) WHERE record_id IS NOT NULL;

-- A record's metadata. A row exists only for a complete upload whose size and SHA-256 matched.
CREATE TABLE records (
  record_id    text PRIMARY KEY,
  tenant_id    text NOT NULL,        -- the patient's tenant
  patient_id   text NOT NULL,
  kind         smallint NOT NULL CHECK (kind BETWEEN 1 AND 3),
  content_type text NOT NULL,
  file_name    text NOT NULL,
  size_bytes   bigint NOT NULL CHECK (size_bytes > 0),
  sha256       bytea NOT NULL CHECK (length(sha256) = 32),
  chunk_count  integer NOT NULL CHECK (chunk_count > 0),
  owner        text NOT NULL,        -- SPIFFE id of the uploading practitioner
  created_at   timestamptz NOT NULL,
  state        text NOT NULL CHECK (state IN ('active', 'archived')),
  retain_until timestamptz,
  CHECK ((state = 'archived') = (retain_until IS NOT NULL))
);
CREATE INDEX records_owner ON records (owner, created_at DESC, record_id DESC);
CREATE INDEX records_patient ON records (patient_id, created_at DESC, record_id DESC);
CREATE INDEX records_tenant ON records (tenant_id);
CREATE INDEX records_retention ON records (retain_until) WHERE state = 'archived';

-- Content, ciphertext only: each row is format || nonce || AES-256-GCM ciphertext || tag of up to
-- 1 MiB of content. Rows of an erased record may outlive it (unreadable without its key) until the
-- purge removes them, so there is deliberately no foreign key to records.
CREATE TABLE record_chunks (
  record_id   text NOT NULL,
  chunk_index integer NOT NULL CHECK (chunk_index >= 0),
  ciphertext  bytea NOT NULL,
  PRIMARY KEY (record_id, chunk_index)
);
-- Ciphertext does not compress: store it out of line without trying.
ALTER TABLE record_chunks ALTER COLUMN ciphertext SET STORAGE EXTERNAL;

-- Read access to one record for one practitioner, until expires_at or revocation.
CREATE TABLE share_grants (
  grant_id       text PRIMARY KEY,
  record_id      text NOT NULL REFERENCES records (record_id) ON DELETE CASCADE,
  grantee        text NOT NULL,      -- SPIFFE id of the practitioner
  grantee_tenant text NOT NULL,
  granted_by     text NOT NULL,      -- SPIFFE id of the practitioner who shared
  created_at     timestamptz NOT NULL,
  expires_at     timestamptz NOT NULL,
  revoked_at     timestamptz
);
-- At most one unrevoked grant per record and grantee: sharing again extends it.
CREATE UNIQUE INDEX share_grants_unrevoked ON share_grants (record_id, grantee)
  WHERE revoked_at IS NULL;
CREATE INDEX share_grants_grantee ON share_grants (grantee, expires_at) WHERE revoked_at IS NULL;
