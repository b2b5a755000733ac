// The one query that reads a patient's current consent versions.
#include "libs/consent_client/consent_store.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "libs/pg/pg_status.h"
#include "libs/pg/sql_array.h"

namespace medgate::consent {
namespace {

absl::Time FromMicros(const pqxx::field& field, absl::Time if_null) {
  return field.is_null() ? if_null : absl::FromUnixMicros(field.as<int64_t>());
}

}  // namespace

const pg::Statement& LoadCurrentConsentsStatement() {
  static const pg::Statement statement = {
      "consent_load_current",
      "SELECT c.consent_id, c.tenant_id, c.purpose, c.actor, v.version, "
      "v.state IS DISTINCT FROM 'granted', "
      "(extract(epoch FROM v.valid_from) * 1000000)::int8, "
      "(extract(epoch FROM v.valid_until) * 1000000)::int8, v.categories "
      "FROM consents c CROSS JOIN LATERAL ("
      "  SELECT version, state, valid_from, valid_until, categories FROM consent_versions cv "
      "  WHERE cv.consent_id = c.consent_id ORDER BY version DESC LIMIT 1) v "
      "WHERE c.patient_id = $1"};
  return statement;
}

absl::StatusOr<std::vector<ConsentRecord>> LoadCurrentConsents(pqxx::transaction_base& txn,
                                                               absl::string_view patient_id) {
  try {
    pqxx::result rows =
        txn.exec_prepared(LoadCurrentConsentsStatement().name, std::string(patient_id));
    std::vector<ConsentRecord> records;
    records.reserve(rows.size());
    for (const pqxx::row& row : rows) {
      ConsentRecord r;
      r.consent_id = row[0].c_str();
      r.tenant_id = row[1].c_str();
      std::optional<Purpose> purpose = PurposeFromName(row[2].c_str());
      if (!purpose) {
        return absl::DataLossError(
            absl::StrCat("consent ", r.consent_id, " has an unknown purpose"));
      }
      r.purpose = *purpose;
      r.actor = row[3].c_str();
      r.version = row[4].as<int64_t>();
      r.revoked = row[5].as<bool>();
      r.valid_from = FromMicros(row[6], absl::InfinitePast());
      r.valid_until = FromMicros(row[7], absl::InfiniteFuture());
      // Kept as stored: a category this code does not know (a later migration's) is one no use
      // here is of, so a consent narrowed to it permits nothing it did not name.
      r.categories = pg::ParseTextArray(row[8]);
      records.push_back(std::move(r));
    }
    return records;
  } catch (const std::exception& e) {
    return pg::StatusFromException(e);
  }
}

}  // namespace medgate::consent
