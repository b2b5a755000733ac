-- A record's SHA-256 is stored sealed under the record's data key, like its file name and content
-- type: in clear, next to the patient's pseudonym and the record's exact size, it would let whoever
-- holds a backup of the shard confirm a guessed document long after the record was erased. Rows
-- written before keep the clear column until the retention sweep seals it; a row has it in
-- exactly one form.
ALTER TABLE records
  ADD COLUMN sha256_sealed bytea,
  ALTER COLUMN sha256 DROP NOT NULL,
  ADD CONSTRAINT records_sha256_one_form CHECK ((sha256 IS NULL) <> (sha256_sealed IS NULL));
-- The sweep finds rows with anything still in clear without a scan.
DROP INDEX records_metadata_in_clear;
CREATE INDEX records_metadata_in_clear ON records (record_id) WHERE file_name IS NOT NULL
  OR content_type IS NOT NULL OR sha256 IS NOT NULL;
