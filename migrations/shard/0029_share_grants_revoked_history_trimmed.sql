-- A share after each revocation adds a grant row, and nothing removed the revoked ones: a sharer
-- sharing and revoking in a loop grew share_grants (and every look-up of the grantee's latest
-- grant) without bound. A share now keeps, of the record's revoked grants to that grantee, the
-- latest only: it still tells the grantee when its access was revoked, and the audit log keeps
-- every share and revocation. The sharing service may not delete grants itself (a grant row is
-- the record of who was let read): this function, run with its owner's rights, deletes only the
-- revoked grants a later revocation superseded.
CREATE FUNCTION medgate_trim_revoked_grants(p_record_id text, p_grantee text)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
  DELETE FROM share_grants g
  WHERE g.record_id = p_record_id AND g.grantee = p_grantee AND g.revoked_at IS NOT NULL
    AND g.grant_id <> (SELECT l.grant_id FROM share_grants l
                       WHERE l.record_id = p_record_id AND l.grantee = p_grantee
                         AND l.revoked_at IS NOT NULL
                       ORDER BY l.created_at DESC LIMIT 1);
$$;
REVOKE ALL ON FUNCTION medgate_trim_revoked_grants(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION medgate_trim_revoked_grants(text, text) TO medgate_sharing;
