-- A record's file name and content type are stored sealed under the record's data key
-- (AES-256-GCM; the associated data names the record and the field), like its content: erasing
-- the key makes them unreadable too. Rows written before keep the clear columns until the
-- retention sweep seals them; a row has each field in exactly one form.
ALTER TABLE records
  ADD COLUMN content_type_sealed bytea,
  ADD COLUMN file_name_sealed bytea,
  ALTER COLUMN content_type DROP NOT NULL,
  ALTER COLUMN file_name DROP NOT NULL,
  ADD CONSTRAINT records_content_type_one_form
    CHECK ((content_type IS NULL) <> (content_type_sealed IS NULL)),
  ADD CONSTRAINT records_file_name_one_form
    CHECK ((file_name IS NULL) <> (file_name_sealed IS NULL));
-- The sweep finds rows still in clear without a scan.
CREATE INDEX records_metadata_in_clear ON records (record_id) WHERE file_name IS NOT NULL
  OR content_type IS NOT NULL;
