-- The control database's audit_append() (0003) hashes the entry's canonical encoding (libs/audit
-- EncodeEntry), which the caller sends with the fields (p_encoded_head, p_encoded_tail). Until now
-- nothing checked that the encoding was the fields': a caller able to run it could append an
-- entry whose hash covers other data, which VerifyChain then reports at that entry forever,
-- hiding what comes after it. The encoding is now checked against the fields (as on the shards,
-- shard migration 0026); a mismatch appends nothing (SQLSTATE 22000).
--
-- A field's encoding: its length in bytes (4 bytes, big-endian), then its UTF-8 bytes.
-- STABLE, as convert_to is: a SQL function declared stricter than what it calls is not inlined
-- into its caller, and each call would cost a function call of its own.
CREATE FUNCTION audit_field(p text) RETURNS bytea LANGUAGE sql STABLE AS $$
  SELECT int4send(octet_length(convert_to(p, 'UTF8'))) || convert_to(p, 'UTF8')
$$;
-- The encoding after the entry's seq and time; the part before them is the encoding's version
-- alone (audit_field('medgate-audit-v1')).
CREATE FUNCTION audit_encoded_tail(
  p_actor text, p_tenant text, p_action text, p_object_type text, p_object_id text,
  p_patient_id text, p_decision text, p_reason text, p_purpose text, p_consent_id text,
  p_consent_version bigint, p_request_id text, p_origin text) RETURNS bytea
LANGUAGE sql STABLE AS $$
  SELECT audit_field(p_actor) || audit_field(p_tenant) || audit_field(p_action)
         || audit_field(p_object_type) || audit_field(p_object_id) || audit_field(p_patient_id)
         || audit_field(p_decision) || audit_field(p_reason) || audit_field(p_purpose)
         || audit_field(p_consent_id) || int8send(p_consent_version)
         || audit_field(p_request_id) || audit_field(p_origin)
$$;
REVOKE ALL ON FUNCTION audit_field(text),
  audit_encoded_tail(text, text, text, text, text, text, text, text, text, text, bigint, text, text)
  FROM PUBLIC;

-- As 0003, with the check; run with its owner's rights, on this schema only, as 0006 set.
CREATE OR REPLACE FUNCTION audit_append(
  p_actor text, p_tenant text, p_action text, p_object_type text, p_object_id text,
  p_patient_id text, p_decision text, p_reason text, p_purpose text, p_consent_id text,
  p_consent_version bigint, p_request_id text, p_origin text,
  p_encoded_head bytea, p_encoded_tail bytea) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
  prev_seq  bigint;
  prev_hash bytea;
  new_seq   bigint;
  new_at_us bigint;
  new_hash  bytea;
BEGIN
  IF p_encoded_head IS DISTINCT FROM audit_field('medgate-audit-v1')
     OR p_encoded_tail IS DISTINCT FROM audit_encoded_tail(
          p_actor, p_tenant, p_action, p_object_type, p_object_id, p_patient_id, p_decision,
          p_reason, p_purpose, p_consent_id, p_consent_version, p_request_id, p_origin) THEN
    RAISE EXCEPTION 'audit_append: the entry''s encoding is not that of its fields'
      USING ERRCODE = '22000';
  END IF;
  SELECT seq, hash INTO prev_seq, prev_hash FROM audit_head WHERE id FOR UPDATE;
  new_seq := prev_seq + 1;
  new_at_us := floor(extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
  new_hash := sha256(prev_hash || p_encoded_head || int8send(new_seq) || int8send(new_at_us)
                     || p_encoded_tail);
  INSERT INTO audit_log (seq, at_us, actor, tenant, action, object_type, object_id, patient_id,
                         decision, reason, purpose, consent_id, consent_version, request_id,
                         origin, prev_hash, hash)
  VALUES (new_seq, new_at_us, p_actor, p_tenant, p_action, p_object_type, p_object_id,
          p_patient_id, p_decision, p_reason, p_purpose, p_consent_id, p_consent_version,
          p_request_id, p_origin, prev_hash, new_hash);
  UPDATE audit_head SET seq = new_seq, hash = new_hash WHERE id;
  RETURN new_seq;
END;
$$;
