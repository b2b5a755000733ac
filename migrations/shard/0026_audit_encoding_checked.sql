-- The chain's functions hash the entry's canonical encoding (libs/audit EncodeEntry), which the
-- caller sends with the fields (p_encoded_head, p_encoded_tail). Until now nothing checked that
-- the encoding was the fields': a caller able to run audit_append_many could append an entry whose
-- hash covers other data, which VerifyChain then reports at that entry forever, hiding what comes
-- after it. The encoding is now checked against the fields, in one statement for every entry of
-- the call; a mismatch appends nothing (SQLSTATE 22000).
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

-- As 0009, with the check; run with its owner's rights, on this schema only, as 0016 set.
CREATE OR REPLACE FUNCTION audit_append_many(
  p_actor text[], p_tenant text[], p_action text[], p_object_type text[], p_object_id text[],
  p_patient_id text[], p_decision text[], p_reason text[], p_purpose text[], p_consent_id text[],
  p_consent_version bigint[], p_request_id text[], p_origin text[],
  p_encoded_head bytea[], p_encoded_tail bytea[]) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
  n          int := coalesce(cardinality(p_actor), 0);
  first_seq  bigint;
  head_hash  bytea;
  at_us      bigint;
  prev_hashes bytea[];
  hashes     bytea[];
  bad        bigint;
BEGIN
  IF n = 0 THEN
    RETURN NULL;
  END IF;
  IF cardinality(p_tenant) IS DISTINCT FROM n OR cardinality(p_action) IS DISTINCT FROM n
     OR cardinality(p_object_type) IS DISTINCT FROM n OR cardinality(p_object_id) IS DISTINCT FROM n
     OR cardinality(p_patient_id) IS DISTINCT FROM n OR cardinality(p_decision) IS DISTINCT FROM n
     OR cardinality(p_reason) IS DISTINCT FROM n OR cardinality(p_purpose) IS DISTINCT FROM n
     OR cardinality(p_consent_id) IS DISTINCT FROM n
     OR cardinality(p_consent_version) IS DISTINCT FROM n
     OR cardinality(p_request_id) IS DISTINCT FROM n OR cardinality(p_origin) IS DISTINCT FROM n
     OR cardinality(p_encoded_head) IS DISTINCT FROM n
     OR cardinality(p_encoded_tail) IS DISTINCT FROM n THEN
    RAISE EXCEPTION 'audit_append_many: every array must have % elements', n;
  END IF;
  SELECT min(e.i) INTO bad
  FROM unnest(p_actor, p_tenant, p_action, p_object_type, p_object_id, p_patient_id, p_decision,
              p_reason, p_purpose, p_consent_id, p_consent_version, p_request_id, p_origin,
              p_encoded_head, p_encoded_tail)
       WITH ORDINALITY AS e(actor, tenant, action, object_type, object_id, patient_id, decision,
                            reason, purpose, consent_id, consent_version, request_id, origin,
                            encoded_head, encoded_tail, i)
  WHERE e.encoded_head IS DISTINCT FROM audit_field('medgate-audit-v1')
     OR e.encoded_tail IS DISTINCT FROM audit_encoded_tail(
          e.actor, e.tenant, e.action, e.object_type, e.object_id, e.patient_id, e.decision,
          e.reason, e.purpose, e.consent_id, e.consent_version, e.request_id, e.origin);
  IF bad IS NOT NULL THEN
    RAISE EXCEPTION 'audit_append_many: entry % of %: its encoding is not that of its fields', bad, n
      USING ERRCODE = '22000';
  END IF;
  SELECT seq + 1, hash INTO first_seq, head_hash FROM audit_head WHERE id FOR UPDATE;
  at_us := floor(extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
  -- The chain, entry after entry; then every entry in one INSERT.
  FOR i IN 1..n LOOP
    prev_hashes[i] := head_hash;
    head_hash := sha256(head_hash || p_encoded_head[i] || int8send(first_seq + i - 1)
                        || int8send(at_us) || p_encoded_tail[i]);
    hashes[i] := head_hash;
  END LOOP;
  INSERT INTO audit_log (seq, at_us, actor, tenant, action, object_type, object_id, patient_id,
                         decision, reason, purpose, consent_id, consent_version, request_id,
                         origin, prev_hash, hash)
  SELECT first_seq + e.i - 1, at_us, e.actor, e.tenant, e.action, e.object_type, e.object_id,
         e.patient_id, e.decision, e.reason, e.purpose, e.consent_id, e.consent_version,
         e.request_id, e.origin, e.prev_hash, e.hash
  FROM unnest(p_actor, p_tenant, p_action, p_object_type, p_object_id, p_patient_id, p_decision,
              p_reason, p_purpose, p_consent_id, p_consent_version, p_request_id, p_origin,
              prev_hashes, hashes)
       WITH ORDINALITY AS e(actor, tenant, action, object_type, object_id, patient_id, decision,
                            reason, purpose, consent_id, consent_version, request_id, origin,
                            prev_hash, hash, i);
  UPDATE audit_head SET seq = first_seq + n - 1, hash = head_hash WHERE id;
  RETURN first_seq + n - 1;
END;
$$;
