-- Consents narrowed to data categories (DOMAIN.md: a consent is "optionally narrowed to an actor,
-- a period, and data categories"). Each version records the categories it grants, empty for
-- every category; a revocation keeps those of what it revokes. The names are the consent
-- client's DataCategories(): vitals by measure, records by kind. A category this list does not
-- name is refused here too, so no writer can store one that no use would ever be of (the consent
-- service also refuses a name given twice, which a CHECK cannot see without a function).
-- The column's constant default is recorded in the catalogue: no row is rewritten. The check is
-- added NOT VALID: every row that exists holds the default, so there is nothing to validate, and
-- the migration (one transaction) holds its lock on consent_versions for no scan. New and
-- changed rows are checked.
ALTER TABLE consent_versions ADD COLUMN categories text[] NOT NULL DEFAULT '{}';

-- One dimension first (CASE: PostgreSQL may evaluate an AND's operands in any order, and <@ on a
-- multidimensional array is an error rather than false), no NULL element, known names only.
ALTER TABLE consent_versions ADD CONSTRAINT consent_versions_categories_known CHECK (
  CASE WHEN coalesce(array_ndims(categories), 1) <> 1 THEN false
       ELSE array_position(categories, NULL) IS NULL
            AND cardinality(categories) <= 10
            AND categories <@ ARRAY['heart-rate', 'oxygen-saturation', 'blood-pressure',
                                    'body-temperature', 'respiratory-rate', 'body-weight',
                                    'blood-glucose', 'document', 'imaging', 'report']::text[]
  END) NOT VALID;
