-- A rule put counts the patients of its territory that live in regions the new rule no longer
-- allows (they stay where they are: routing refuses the put unless ops keep them there knowingly).
-- The count reads this index only, not every patient of every territory. Building it locks the
-- directory against placements for as long as it takes (seconds for millions of patients).
CREATE INDEX patients_territory_region ON patients (territory, region_id);
