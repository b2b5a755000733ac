-- Appending to the control database's audit chain, as the shards do (shard migration 0005): every
-- entry is chained by this function, on the database's clock, in one round trip (libs/audit
-- Append). It waits for the chain head's row lock, takes the time after it, chains the entry and
-- moves the head. p_encoded_head and p_encoded_tail are the entry's canonical encoding around its
-- seq and time: hash = SHA-256(prev_hash || head || seq (8 bytes, big-endian) || at_us (8 bytes)
-- || tail).
CREATE FUNCTION audit_append(
  p_actor text, p_tenant text, p_action text, p_object_type text, p_object_id text,
  p_patient_id text, p_decision text, p_reason text, p_purpose text, p_consent_id text,
  p_consent_version bigint, p_request_id text, p_origin text,
  p_encoded_head bytea, p_encoded_tail bytea) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
  prev_seq  bigint;
  prev_hash bytea;
  new_seq   bigint;
  new_at_us bigint;
  new_hash  bytea;
BEGIN
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
