-- A regional shard's hash-chained audit log (see libs/audit).
CREATE TABLE audit_log (
  seq         bigint PRIMARY KEY,
  at_us       bigint NOT NULL,   -- microseconds since the Unix epoch, UTC
  actor       text   NOT NULL,   -- SPIFFE id of the caller
  tenant      text   NOT NULL,
  action      text   NOT NULL CHECK (action IN ('create', 'read', 'update', 'delete', 'execute')),
  object_type text   NOT NULL,
  object_id   text   NOT NULL,
  patient_id  text   NOT NULL,   -- pseudonym or ''
  decision    text   NOT NULL CHECK (decision IN ('permit', 'deny')),
  reason      text   NOT NULL,
  purpose     text   NOT NULL,   -- purpose of use, or ''
  consent_id  text   NOT NULL,   -- the consent a decision rests on, or ''
  consent_version bigint NOT NULL,
  request_id  text   NOT NULL,
  origin      text   NOT NULL,
  prev_hash   bytea  NOT NULL CHECK (length(prev_hash) = 32),
  hash        bytea  NOT NULL CHECK (length(hash) = 32)
);
CREATE INDEX audit_log_patient ON audit_log (patient_id, seq) WHERE patient_id <> '';
CREATE INDEX audit_log_tenant ON audit_log (tenant, seq);

-- The chain head: one row whose lock serializes appenders so the chain never forks.
CREATE TABLE audit_head (
  id   boolean PRIMARY KEY DEFAULT true CHECK (id),
  seq  bigint NOT NULL,
  hash bytea  NOT NULL CHECK (length(hash) = 32)
);
INSERT INTO audit_head (id, seq, hash) VALUES (true, 0, decode(repeat('00', 32), 'hex'));

-- Append-only: entries are never updated or deleted through SQL.
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP;
END;
$$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
  FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
  FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
