-- Consents narrowed to data categories (DOMAIN.md: a consent is "optionally narrowed to an actor,
-- a period, and data categories"). Each version records the categories it grants, empty for
-- every category; a revocation keeps those of what it revokes. The names are the consent
-- client's DataCategories(): vitals by measure, records by kind. A category this list does not
-- name is refused here too, so no writer can store one that no use would ever be of.
-- The column's constant default is recorded in the catalogue: no row is rewritten. The check is
-- added NOT VALID, then validated, which reads the table without blocking its writers.
ALTER TABLE consent_versions ADD COLUMN categories text[] NOT NULL DEFAULT '{}';

ALTER TABLE consent_versions ADD CONSTRAINT consent_versions_categories_known CHECK (
  categories <@ ARRAY['heart-rate', 'oxygen-saturation', 'blood-pressure', 'body-temperature',
                      'respiratory-rate', 'body-weight', 'blood-glucose', 'document', 'imaging',
                      'report']::text[]
  AND array_position(categories, NULL) IS NULL
  AND coalesce(array_ndims(categories), 1) = 1
  AND cardinality(categories) <= 10) NOT VALID;

ALTER TABLE consent_versions VALIDATE CONSTRAINT consent_versions_categories_known;
