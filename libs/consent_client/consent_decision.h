// The access decision as a pure function of a patient's consents, a purpose, an actor and a time,
// so that expiry needs no job and the same answer comes from the cache and from the database.
#ifndef MEDGATE_LIBS_CONSENT_CLIENT_CONSENT_DECISION_H_
#define MEDGATE_LIBS_CONSENT_CLIENT_CONSENT_DECISION_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "libs/consent_client/consent_cache.h"

namespace medgate::consent {

// The latest version of one consent: all a decision needs.
struct ConsentRecord {
  std::string consent_id;
  std::string tenant_id;  // the patient's tenant
  Purpose purpose = Purpose::kCare;
  std::string actor;  // SPIFFE id the consent is narrowed to; "" covers the whole tenant
  int64_t version = 0;
  bool revoked = false;
  absl::Time valid_from = absl::InfinitePast();
  absl::Time valid_until = absl::InfiniteFuture();  // exclusive
  // The data categories the consent is narrowed to, each once; empty: every category.
  std::vector<std::string> categories;
};

// The data categories a consent may be narrowed to (DOMAIN.md): vitals by measure, then records
// by kind. Each vital code and each record kind is of exactly one.
//   heart-rate, oxygen-saturation, blood-pressure, body-temperature, respiratory-rate,
//   body-weight, blood-glucose, document, imaging, report
absl::Span<const absl::string_view> DataCategories();
// Those of records (document, imaging, report); the others are measures of vitals.
absl::Span<const absl::string_view> RecordCategories();
bool IsDataCategory(absl::string_view name);
// The categories a grant names, checked: each known and given once, at most every category.
// INVALID_ARGUMENT naming `field` and the offending entry otherwise. Sorted on return.
absl::StatusOr<std::vector<std::string>> ValidateCategories(std::vector<std::string> categories,
                                                             absl::string_view field);
// Whether a use of `category` ("" for none in particular) falls within the consent's.
bool CoversCategory(const ConsentRecord& record, absl::string_view category);

// What a consent amounts to at a given time.
enum class ConsentStatus { kGranted, kRevoked, kExpired, kNotYetValid };

ConsentStatus StatusAt(const ConsentRecord& record, absl::Time now);

// Purposes by proto number (1..5) and by name ("CARE", ...); nullopt for anything else.
std::optional<Purpose> PurposeFromNumber(int number);
std::optional<Purpose> PurposeFromName(absl::string_view name);

// The tenant T of spiffe://TD/tenant/T/{device,practitioner,app}/X; "" for any other form.
// The trust domain is not checked here: callers pass identities they have verified.
absl::string_view TenantOfActor(absl::string_view actor);

// Default deny. Among `consents` (one patient's), those for `purpose` that cover `actor`:
// the one narrowed to exactly `actor`, and the tenant-wide one when `actor` belongs to the
// patient's tenant (an empty `actor` is covered by none). The first of them that is granted, within
// its period and covers `category` (CoversCategory) permits (the narrowed one first); otherwise
// the decision is a deny for the most specific of them, with its reason: CATEGORY_NOT_COVERED
// for one that is granted but narrowed to other categories. None for the purpose: NO_CONSENT;
// some, but none covering the actor: ACTOR_NOT_COVERED.
AccessDecision Decide(absl::Span<const ConsentRecord> consents, Purpose purpose,
                      absl::string_view actor, absl::string_view category, absl::Time now);

}  // namespace medgate::consent

#endif  // MEDGATE_LIBS_CONSENT_CLIENT_CONSENT_DECISION_H_
