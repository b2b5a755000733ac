-- A record's grants whatever their state: the latest grant of a record to a grantee (sql.h,
-- kSelectLatestGrant, on every grantee download, re-share and revocation by grantee) and the
-- cascade of a record's erasure. The partial indexes of 0004 hold unrevoked grants only, so both
-- scanned the whole table, which revoked and expired grants keep growing.
CREATE INDEX share_grants_by_record ON share_grants (record_id, grantee, created_at DESC);
