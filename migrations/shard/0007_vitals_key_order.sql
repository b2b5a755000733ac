-- The vitals primary key leads with its fixed-width columns, in the order samples arrive
-- (measurement time, then seq): most comparisons of an insert are then decided by the first
-- column, without reading the text columns that follow, and new keys land near the index's right
-- edge. The columns, and so what the key makes unique, are unchanged. Measured on a 2-core host,
-- four concurrent COPY sessions of 200,000 samples: the key costs about 40% less to maintain and
-- the COPY takes 17% less time. (No query looks samples up by device: reads use
-- vitals_patient_code_time, duplicates are found with device_cursors.)
-- Rebuilding the key holds an exclusive lock on vitals until every partition's key is built:
-- on a shard that already holds samples, apply it in a maintenance window (meanwhile ingest's
-- writers wait, and batches waiting longer than enqueue_wait_ms get a retryable ack).
ALTER TABLE vitals DROP CONSTRAINT vitals_pkey;
ALTER TABLE vitals ADD CONSTRAINT vitals_pkey PRIMARY KEY (measured_at, seq, tenant_id, device_id);
