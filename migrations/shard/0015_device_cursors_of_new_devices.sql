-- A new device's cursor row is made before the cursors are locked. Before, the cursor step locked
-- only the rows that existed: two writers (two ingest instances, a device's resend reaching the
-- second while the first still writes) both took a new device's cursor for 0, both copied its
-- samples, and the later transaction failed on the vitals key, with every other batch in it. Now
-- the later one waits on the row the earlier inserted, then reads its committed cursor and counts
-- those samples as duplicates.
CREATE OR REPLACE FUNCTION medgate_advance_device_cursors(tenants text[], devices text[], max_seqs bigint[])
RETURNS TABLE (tenant_id text, device_id text, max_seq bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
  -- In the arrays' order (sorted by the writer), as the locks below: writers never deadlock.
  INSERT INTO device_cursors AS dc (tenant_id, device_id, max_seq)
    SELECT k.t, k.d, 0 FROM unnest(tenants, devices) WITH ORDINALITY AS k(t, d, n) ORDER BY k.n
    ON CONFLICT (tenant_id, device_id) DO NOTHING;
  RETURN QUERY
    SELECT c.tenant_id, c.device_id, c.max_seq
    FROM unnest(tenants, devices) WITH ORDINALITY AS k(t, d, n)
    CROSS JOIN LATERAL (
      SELECT dc.tenant_id, dc.device_id, dc.max_seq FROM device_cursors dc
      WHERE dc.tenant_id = k.t AND dc.device_id = k.d FOR UPDATE) AS c
    ORDER BY k.n;
  -- Every row exists and is locked by now: a plain update, not a second insert attempt.
  UPDATE device_cursors AS dc SET max_seq = GREATEST(dc.max_seq, k.m), updated_at = now()
    FROM unnest(tenants, devices, max_seqs) AS k(t, d, m)
    WHERE dc.tenant_id = k.t AND dc.device_id = k.d;
END;
$$;
