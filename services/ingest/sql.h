// Every statement the ingest service runs against the shards.
#ifndef MEDGATE_SERVICES_INGEST_SQL_H_
#define MEDGATE_SERVICES_INGEST_SQL_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "libs/audit/audit_log.h"
#include "libs/pg/pool.h"
#include "libs/pg/sql_array.h"

namespace medgate::ingest::sql {

inline constexpr char kReadVitals[] = "read_vitals";
inline constexpr char kEnsurePartitions[] = "ensure_partitions";
inline constexpr char kEraseVitals[] = "erase_vitals";
inline constexpr char kStoredVitalCodes[] = "stored_vital_codes";

// The samples one erasure transaction deletes, at most (plus those measured at the same instant
// as the last of them).
inline constexpr int kEraseVitalsRows = 10000;

// The writer's transaction is two query strings (run through libpq by the COPY writer). This is
// the first: open the transaction, lock and read the devices' cursors and advance them to the
// highest seq the transaction brings (medgate_advance_device_cursors, shard migration 0008), and
// start the COPY of the rows. `quote` makes a SQL literal of a value (PQescapeLiteral); the arrays
// are text[] literals of the devices' tenant ids, device ids and highest seqs, in key order.
// `refused`, when given, is four text[] literals (tenant ids, device ids, seqs, measurement times)
// of samples refused for lack of consent: which of them are already stored is read, under the
// cursors' locks, before the COPY (by the primary key), as their positions in the arrays.
struct RefusedKeys {
  std::string tenants;
  std::string devices;
  std::string seqs;
  std::string measured_at;
};
template <typename Quote>
absl::StatusOr<std::string> WriteVitalsQuery(Quote quote, const std::string& tenants,
                                             const std::string& devices,
                                             const std::string& max_seqs,
                                             const RefusedKeys* refused = nullptr) {
  absl::StatusOr<std::string> t = quote(tenants);
  if (!t.ok()) return t.status();
  absl::StatusOr<std::string> d = quote(devices);
  if (!d.ok()) return d.status();
  absl::StatusOr<std::string> m = quote(max_seqs);
  if (!m.ok()) return m.status();
  std::string stored_refused;
  if (refused != nullptr) {
    std::vector<std::string> literals;
    for (const std::string* array :
         {&refused->tenants, &refused->devices, &refused->seqs, &refused->measured_at}) {
      absl::StatusOr<std::string> literal = quote(*array);
      if (!literal.ok()) return literal.status();
      literals.push_back(*std::move(literal));
    }
    // Answers the 1-based positions, in the arrays, of those found.
    stored_refused = absl::StrCat(
        "SELECT r.i FROM unnest(", literals[0], "::text[], ", literals[1], "::text[], ",
        literals[2], "::bigint[], ", literals[3],
        "::timestamptz[]) WITH ORDINALITY AS r(tenant_id, device_id, seq, measured_at, i) "
        "JOIN vitals v USING (measured_at, seq, tenant_id, device_id); ");
  }
  return absl::StrCat(
      "BEGIN; "
      "SELECT tenant_id, device_id, max_seq FROM medgate_advance_device_cursors(", *t,
      "::text[], ", *d, "::text[], ", *m, "::bigint[]); ", stored_refused,
      "COPY vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, measured_at, "
      "latitude, longitude, accuracy_m) FROM STDIN (FORMAT binary)");
}

// The second, once the rows are in: the audit entries of what the transaction stored, chained by
// audit_append_many (shard migration 0009) last so that the chain head is locked only until the
// COMMIT that follows; COMMIT alone when there is no entry.
template <typename Quote>
absl::StatusOr<std::string> AuditAndCommitQuery(Quote quote,
                                                const std::vector<audit::Entry>& entries) {
  if (entries.empty()) return std::string("COMMIT");
  const std::vector<std::string> args = audit::AppendManyArgs(entries);
  std::string query = "SELECT audit_append_many(";
  for (int i = 0; i < audit::kAppendManyArgs; ++i) {
    absl::StatusOr<std::string> literal = quote(args[i]);
    if (!literal.ok()) return literal.status();
    absl::StrAppend(&query, i == 0 ? "" : ", ", *literal, "::", audit::kAppendManyArgTypes[i]);
  }
  absl::StrAppend(&query, "); COMMIT");
  return query;
}

inline const std::vector<pg::Statement>& Statements() {
  static const std::vector<pg::Statement> statements = {
      // A page of a patient's readings of some codes ($2, distinct), in (measured_at, device_id,
      // seq) order after the page token ($5, $6, $7). Each code's next rows come from its own
      // walk of vitals_patient_code_time in time order, at most a page of them; the page is the
      // first of those. One scan of every code at once would sort the patient's whole time range
      // for each page.
      {kReadVitals,
       "SELECT v.device_id, v.seq, v.loinc, v.value, v.ucum, "
       "(extract(epoch from v.measured_at) * 1000000)::bigint, "
       "(extract(epoch from v.received_at) * 1000000)::bigint, v.latitude, v.longitude, "
       "v.accuracy_m "
       "FROM unnest($2::text[]) AS c(code) CROSS JOIN LATERAL ("
       "SELECT device_id, seq, loinc, value, ucum, measured_at, received_at, latitude, longitude, "
       "accuracy_m FROM vitals WHERE patient_id = $1 AND loinc = c.code "
       "AND measured_at >= greatest(to_timestamp($3::float8 / 1000000), "
       "to_timestamp($5::float8 / 1000000)) "
       "AND measured_at < to_timestamp($4::float8 / 1000000) "
       "AND (measured_at, device_id, seq) > (to_timestamp($5::float8 / 1000000), $6, $7) "
       "ORDER BY measured_at, device_id, seq LIMIT $8) AS v "
       "ORDER BY v.measured_at, v.device_id, v.seq LIMIT $8"},
      {kEnsurePartitions, "SELECT medgate_ensure_vitals_partitions(2, 12)"},
      // The earliest samples of one of a patient's codes: $1 tenant, $2 patient, $3 code, $4
      // the most to delete (shard migration 0031).
      {kEraseVitals, "SELECT medgate_erase_vitals($1, $2, $3, $4)"},
      // The codes a patient's samples have (index vitals (patient, code, time): one look-up a
      // code, skipping from one to the next).
      {kStoredVitalCodes,
       "WITH RECURSIVE codes(loinc) AS ("
       " (SELECT loinc FROM vitals WHERE tenant_id = $1 AND patient_id = $2 ORDER BY loinc LIMIT 1)"
       " UNION ALL"
       " SELECT (SELECT v.loinc FROM vitals v WHERE v.tenant_id = $1 AND v.patient_id = $2"
       "         AND v.loinc > c.loinc ORDER BY v.loinc LIMIT 1)"
       " FROM codes c WHERE c.loinc IS NOT NULL)"
       " SELECT loinc FROM codes WHERE loinc IS NOT NULL"},
  };
  return statements;
}

}  // namespace medgate::ingest::sql

#endif  // MEDGATE_SERVICES_INGEST_SQL_H_
