-- A tenant's version, as a residency rule has one: 1 when created, one more at every upsert.
-- UpsertTenant's expected_version refuses (ABORTED) a change made from an older read of the
-- tenant: an upsert replaces the whole tenant, so one resent from a stale copy would undo what came
-- between the read and it (a suspension, a narrowing).
SET LOCAL lock_timeout = '30s';
ALTER TABLE tenants ADD COLUMN version bigint NOT NULL DEFAULT 1 CHECK (version > 0);
GRANT UPDATE (version) ON tenants TO medgate_routing;
