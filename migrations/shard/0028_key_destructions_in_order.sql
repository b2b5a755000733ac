-- The sharing service's sweep reads the keys queued for destruction oldest first, a batch at a
-- time (kSelectKeyDestructions): by this index, not by sorting the whole queue, which grows with
-- every erasure for as long as the region's vault does not answer.
CREATE INDEX key_destructions_in_order ON key_destructions (requested_at, key_id);
