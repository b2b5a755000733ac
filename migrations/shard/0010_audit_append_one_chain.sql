-- One implementation of the shard's audit chaining: audit_append() (0005), used for single
-- entries (sharing, consent, ReadVitals), becomes audit_append_many() (0009) with one entry, so the
-- head lock, the entry time and the hash formula exist once in SQL.
CREATE OR REPLACE FUNCTION audit_append(
  p_actor text, p_tenant text, p_action text, p_object_type text, p_object_id text,
  p_patient_id text, p_decision text, p_reason text, p_purpose text, p_consent_id text,
  p_consent_version bigint, p_request_id text, p_origin text,
  p_encoded_head bytea, p_encoded_tail bytea) RETURNS bigint
LANGUAGE sql AS $$
  SELECT audit_append_many(
    ARRAY[p_actor], ARRAY[p_tenant], ARRAY[p_action], ARRAY[p_object_type], ARRAY[p_object_id],
    ARRAY[p_patient_id], ARRAY[p_decision], ARRAY[p_reason], ARRAY[p_purpose],
    ARRAY[p_consent_id], ARRAY[p_consent_version], ARRAY[p_request_id], ARRAY[p_origin],
    ARRAY[p_encoded_head], ARRAY[p_encoded_tail]);
$$;
