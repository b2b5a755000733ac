-- An upload retried with the request id of one already stored (its answer was lost: a dropped
-- connection, a timeout) is answered with that record instead of storing the content twice. The
-- request ids the uploading practitioners gave, each with the record it stored, are kept here
-- rather than in records: a record's erasure leaves its request id behind, so that a late retry
-- of its upload is refused instead of storing the erased document again. The retention sweep
-- deletes request ids older than 30 days (a retry comes within minutes). A new table: nothing
-- waits while it is made.
CREATE TABLE record_requests (
  owner      text NOT NULL,   -- SPIFFE id of the uploading practitioner
  request_id text NOT NULL CHECK (request_id <> ''),
  record_id  text NOT NULL,   -- its record, which may since have been erased
  created_at timestamptz NOT NULL,
  PRIMARY KEY (owner, request_id)
);
CREATE INDEX record_requests_by_age ON record_requests (created_at);
REVOKE ALL ON record_requests FROM PUBLIC;
GRANT SELECT, INSERT, DELETE ON record_requests TO medgate_sharing;
