// Reading a patient's current consent versions from the home shard: the cache's misses (and the
// benchmark's uncached reference) run this one statement.
#ifndef MEDGATE_LIBS_CONSENT_CLIENT_CONSENT_STORE_H_
#define MEDGATE_LIBS_CONSENT_CLIENT_CONSENT_STORE_H_

#include <vector>

#include <pqxx/pqxx>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "libs/consent_client/consent_decision.h"
#include "libs/pg/pool.h"

namespace medgate::consent {

// Prepare this on every connection LoadCurrentConsents runs on.
const pg::Statement& LoadCurrentConsentsStatement();

// The latest version of each of the patient's consents, in no particular order. Database errors
// become Status (libs/pg mapping); the caller decides whether the connection is broken.
absl::StatusOr<std::vector<ConsentRecord>> LoadCurrentConsents(pqxx::transaction_base& txn,
                                                               absl::string_view patient_id);

}  // namespace medgate::consent

#endif  // MEDGATE_LIBS_CONSENT_CLIENT_CONSENT_STORE_H_
