-- An upload retried with the request id of one already stored (its answer was lost: a dropped
-- connection, a timeout) is answered with that record instead of storing the content twice. The
-- request id the uploading practitioner gave is kept with the record; '' when none was given, and
-- for records stored before this migration or by a version before it during a rolling upgrade,
-- which no retry matches. A column with a constant default rewrites nothing: the table's lock is
-- held only for the change of its definition. Its index is migration 0024.
SET LOCAL lock_timeout = '30s';
ALTER TABLE records ADD COLUMN IF NOT EXISTS request_id text NOT NULL DEFAULT '';
