-- Per-patient, per-purpose consents of a shard's patients: append-only versions, change feed.
-- One row per (patient, purpose, actor); its history is in consent_versions and is never rewritten.
CREATE TABLE consents (
  consent_id  text PRIMARY KEY,      -- server-assigned, stable across versions
  patient_id  text NOT NULL,         -- pseudonym from the control directory
  tenant_id   text NOT NULL,         -- the patient's tenant
  purpose     text NOT NULL CHECK (purpose IN ('CARE', 'REMOTE_MONITORING', 'RECORD_SHARING',
                                               'RESEARCH', 'GEOLOCATION')),
  actor       text NOT NULL,         -- SPIFFE id of one practitioner or app; '' = the whole tenant
  created_at  timestamptz NOT NULL DEFAULT now(),
  UNIQUE (patient_id, purpose, actor)
);

-- Every grant or revocation adds a version. Expiry is not a version: it is computed from
-- valid_until when the consent is read, so no job has to run for a consent to stop permitting.
CREATE TABLE consent_versions (
  consent_id   text   NOT NULL REFERENCES consents,
  version      bigint NOT NULL CHECK (version > 0),
  state        text   NOT NULL CHECK (state IN ('granted', 'revoked')),
  valid_from   timestamptz NOT NULL,
  valid_until  timestamptz,          -- NULL: until revoked
  evidence_ref text   NOT NULL,      -- a reference to the evidence, never the document
  reason       text   NOT NULL,      -- revocation reason, '' for grants
  recorded_by  text   NOT NULL,      -- SPIFFE id of the caller
  recorded_at  timestamptz NOT NULL,
  request_id   text   NOT NULL,
  PRIMARY KEY (consent_id, version),
  CHECK (valid_until IS NULL OR valid_until > valid_from)
);

-- History is never rewritten: versions (and the consents they belong to) are insert-only.
CREATE FUNCTION consents_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP;
END;
$$;
CREATE TRIGGER consent_versions_no_update BEFORE UPDATE OR DELETE ON consent_versions
  FOR EACH ROW EXECUTE FUNCTION consents_append_only();
CREATE TRIGGER consent_versions_no_truncate BEFORE TRUNCATE ON consent_versions
  FOR EACH STATEMENT EXECUTE FUNCTION consents_append_only();
CREATE TRIGGER consents_no_update BEFORE UPDATE OR DELETE ON consents
  FOR EACH ROW EXECUTE FUNCTION consents_append_only();
CREATE TRIGGER consents_no_truncate BEFORE TRUNCATE ON consents
  FOR EACH STATEMENT EXECUTE FUNCTION consents_append_only();

-- The change feed of consent caches (libs/consent_client): every new version notifies
-- consent_changed with the patient's id. NOTIFY is transactional, so listeners hear of a change
-- when it commits and never of one that rolls back. Done by a trigger so that no writer, ops SQL
-- included, can change a consent without the caches hearing of it.
CREATE FUNCTION consent_versions_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('consent_changed',
                    (SELECT patient_id FROM consents WHERE consent_id = NEW.consent_id));
  RETURN NULL;
END;
$$;
CREATE TRIGGER consent_versions_notify AFTER INSERT ON consent_versions
  FOR EACH ROW EXECUTE FUNCTION consent_versions_notify();
