-- The erased records whose chunks are left to purge, queued by the records table's trigger in the
-- transaction that erases them: the purge deletes their chunks instead of looking through every
-- chunk of the shard for one without its record (a full scan on every sweep, in a vault of
-- millions of chunks, most of them kept). Records are not written meanwhile (the lock), so the
-- chunks already orphaned are all queued.
LOCK TABLE records IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE chunk_purge_queue (
  record_id text PRIMARY KEY,
  queued_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO chunk_purge_queue (record_id)
  SELECT DISTINCT c.record_id FROM record_chunks c
  WHERE NOT EXISTS (SELECT 1 FROM records r WHERE r.record_id = c.record_id);

-- Run with its owner's rights: the sharing service reads and empties the queue, and cannot add
-- to it.
CREATE FUNCTION medgate_queue_chunk_purge() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
  INSERT INTO chunk_purge_queue (record_id) VALUES (OLD.record_id) ON CONFLICT DO NOTHING;
  RETURN OLD;
END
$$;
REVOKE ALL ON FUNCTION medgate_queue_chunk_purge() FROM PUBLIC;
CREATE TRIGGER records_queue_chunk_purge AFTER DELETE ON records
  FOR EACH ROW EXECUTE FUNCTION medgate_queue_chunk_purge();

REVOKE ALL ON chunk_purge_queue FROM PUBLIC;
GRANT SELECT, DELETE ON chunk_purge_queue TO medgate_sharing;
