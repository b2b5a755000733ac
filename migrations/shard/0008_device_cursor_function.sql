-- The ingest writer's cursor step as one function: lock the given devices' cursors, return where
-- each stood, and advance each to the given seq when that is higher. A function's statements are
-- planned once per session and their plans kept, where the same SQL sent as text was parsed and
-- planned again in every transaction (about a tenth of a writer backend's time at low load); named
-- prepared statements would do the same but do not survive a transaction-pooling proxy in front
-- of the shard. Each device's cursor is a LATERAL index look-up, locked in the order of the
-- arrays: the writer sorts them, so concurrent writers of one shard lock in the same order and
-- never deadlock.
CREATE FUNCTION medgate_advance_device_cursors(tenants text[], devices text[], max_seqs bigint[])
RETURNS TABLE (tenant_id text, device_id text, max_seq bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
  RETURN QUERY
    SELECT c.tenant_id, c.device_id, c.max_seq
    FROM unnest(tenants, devices) WITH ORDINALITY AS k(t, d, n)
    CROSS JOIN LATERAL (
      SELECT dc.tenant_id, dc.device_id, dc.max_seq FROM device_cursors dc
      WHERE dc.tenant_id = k.t AND dc.device_id = k.d FOR UPDATE) AS c
    ORDER BY k.n;
  INSERT INTO device_cursors AS dc (tenant_id, device_id, max_seq)
    SELECT * FROM unnest(tenants, devices, max_seqs)
    ON CONFLICT (tenant_id, device_id) DO UPDATE
    SET max_seq = GREATEST(dc.max_seq, EXCLUDED.max_seq), updated_at = now();
END;
$$;
