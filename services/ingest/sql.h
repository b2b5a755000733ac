// Every statement the ingest service runs against the shards.
#ifndef MEDGATE_SERVICES_INGEST_SQL_H_
#define MEDGATE_SERVICES_INGEST_SQL_H_

#include <vector>

#include "libs/pg/pool.h"

namespace medgate::ingest::sql {

inline constexpr char kReadVitals[] = "read_vitals";
inline constexpr char kEnsurePartitions[] = "ensure_partitions";

// Locks are taken in key order, so concurrent writers of one shard never deadlock.
// The writer's statements (run through libpq by the COPY writer).
inline constexpr char kLockCursorsSql[] =
    "SELECT c.tenant_id, c.device_id, c.max_seq FROM device_cursors c "
    "JOIN unnest($1::text[], $2::text[]) AS k(tenant_id, device_id) "
    "ON c.tenant_id = k.tenant_id AND c.device_id = k.device_id "
    "ORDER BY c.tenant_id, c.device_id FOR UPDATE OF c";
inline constexpr char kUpsertCursorsSql[] =
    "INSERT INTO device_cursors (tenant_id, device_id, max_seq) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) "
    "ON CONFLICT (tenant_id, device_id) DO UPDATE "
    "SET max_seq = GREATEST(device_cursors.max_seq, EXCLUDED.max_seq), updated_at = now()";

inline const std::vector<pg::Statement>& Statements() {
  static const std::vector<pg::Statement> statements = {
      {kReadVitals,
       "SELECT device_id, seq, loinc, value, ucum, "
       "(extract(epoch from measured_at) * 1000000)::bigint, "
       "(extract(epoch from received_at) * 1000000)::bigint, latitude, longitude, accuracy_m "
       "FROM vitals WHERE patient_id = $1 AND (cardinality($2::text[]) = 0 OR loinc = ANY($2::text[])) "
       "AND measured_at >= to_timestamp($3::float8 / 1000000) "
       "AND measured_at < to_timestamp($4::float8 / 1000000) "
       "AND (measured_at, device_id, seq) > (to_timestamp($5::float8 / 1000000), $6, $7) "
       "ORDER BY measured_at, device_id, seq LIMIT $8"},
      {kEnsurePartitions, "SELECT medgate_ensure_vitals_partitions(2, 12)"},
  };
  return statements;
}

}  // namespace medgate::ingest::sql

#endif  // MEDGATE_SERVICES_INGEST_SQL_H_
