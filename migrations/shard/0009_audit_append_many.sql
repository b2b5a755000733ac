-- Appending several audit entries at once, as audit_append() (0005) appends one: the chain head's
-- row lock is taken once, every entry gets the time taken after it, and each is chained to the one
-- before. The ingest writer appends one entry per stored device batch in the transaction that
-- stores the batches, just before its COMMIT, so the head is locked for that moment only. Element i
-- of every array is entry i; p_encoded_head and p_encoded_tail are each entry's canonical encoding
-- around its seq and time (libs/audit EncodeEntry). Returns the last entry's seq (NULL for none).
CREATE FUNCTION audit_append_many(
  p_actor text[], p_tenant text[], p_action text[], p_object_type text[], p_object_id text[],
  p_patient_id text[], p_decision text[], p_reason text[], p_purpose text[], p_consent_id text[],
  p_consent_version bigint[], p_request_id text[], p_origin text[],
  p_encoded_head bytea[], p_encoded_tail bytea[]) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
  n          int := coalesce(cardinality(p_actor), 0);
  first_seq  bigint;
  head_hash  bytea;
  at_us      bigint;
  prev_hashes bytea[];
  hashes     bytea[];
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
