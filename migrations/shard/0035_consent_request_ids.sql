-- A request id names one change of consent: the consent service looks up what a caller recorded
-- under a request id across the shard's consents, not only within the consent the request names,
-- so that the same id sent for another patient, purpose or actor (or a grant's id sent with a
-- revocation) is refused instead of recording a second change.
CREATE INDEX consent_versions_by_request ON consent_versions (recorded_by, request_id);
