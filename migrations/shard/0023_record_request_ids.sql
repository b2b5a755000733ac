-- An upload retried with the request id of one already stored (its answer was lost: a dropped
-- connection, a timeout) is answered with that record instead of storing the content twice. The
-- request id the uploading practitioner gave is kept with the record; '' when none was given (and
-- for records stored before this migration), which is never matched. Adding the column with a
-- constant default rewrites nothing; the index is built while uploads wait (records are one small
-- row each).
SET LOCAL lock_timeout = '30s';
ALTER TABLE records ADD COLUMN request_id text NOT NULL DEFAULT '';
CREATE UNIQUE INDEX records_owner_request ON records (owner, request_id) WHERE request_id <> '';
