-- Tenants, versioned residency rules, the patient directory and device assignments.
CREATE TABLE tenants (
  tenant_id     text PRIMARY KEY,
  display_name  text NOT NULL,
  territories   text[] NOT NULL,
  region_ids    text[],                 -- NULL: no narrowing of the residency rules
  active        boolean NOT NULL,
  pseudonym_key bytea NOT NULL CHECK (length(pseudonym_key) = 32),  -- never leaves the service
  created_at    timestamptz NOT NULL DEFAULT now(),
  updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Every change adds a version; the current rule of a territory is its highest version.
CREATE TABLE residency_rules (
  territory     text NOT NULL,
  version       bigint NOT NULL CHECK (version > 0),
  region_ids    text[] NOT NULL,
  readable_from text[] NOT NULL,
  updated_at    timestamptz NOT NULL DEFAULT now(),
  updated_by    text NOT NULL,
  PRIMARY KEY (territory, version)
);

-- The directory: pseudonym, tenant, territory, home region. No patient reference, no names.
CREATE TABLE patients (
  patient_id   text PRIMARY KEY,        -- HMAC of the tenant's patient reference under its key
  tenant_id    text NOT NULL REFERENCES tenants,
  territory    text NOT NULL,
  region_id    text NOT NULL,
  rule_version bigint NOT NULL,
  created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX patients_tenant ON patients (tenant_id);

CREATE TABLE devices (
  tenant_id   text NOT NULL REFERENCES tenants,
  device_id   text NOT NULL,
  patient_id  text REFERENCES patients,  -- NULL: not assigned
  updated_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (tenant_id, device_id)
);
CREATE INDEX devices_patient ON devices (patient_id) WHERE patient_id IS NOT NULL;
