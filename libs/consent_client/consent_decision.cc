// The access decision over a patient's current consent versions.
#include "libs/consent_client/consent_decision.h"

#include <algorithm>
#include <iterator>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"

namespace medgate::consent {
namespace {

// Vitals by measure, then records by kind (RecordCategories() is the tail).
constexpr absl::string_view kCategories[] = {
    "heart-rate",       "oxygen-saturation", "blood-pressure", "body-temperature",
    "respiratory-rate", "body-weight",       "blood-glucose",  "document",
    "imaging",          "report"};
constexpr size_t kRecordCategories = 3;

constexpr Purpose kPurposes[] = {Purpose::kCare, Purpose::kRemoteMonitoring,
                                 Purpose::kRecordSharing, Purpose::kResearch,
                                 Purpose::kGeolocation};

AccessReason ReasonFor(ConsentStatus status) {
  switch (status) {
    case ConsentStatus::kGranted: return AccessReason::kPermitted;
    case ConsentStatus::kRevoked: return AccessReason::kRevoked;
    case ConsentStatus::kExpired: return AccessReason::kExpired;
    case ConsentStatus::kNotYetValid: return AccessReason::kNotYetValid;
  }
  return AccessReason::kNoConsent;
}

// The next time the status of `record` changes by itself after `now`.
absl::Time NextChange(const ConsentRecord& record, absl::Time now) {
  if (record.revoked) return absl::InfiniteFuture();
  if (now < record.valid_from) return record.valid_from;
  if (now < record.valid_until) return record.valid_until;
  return absl::InfiniteFuture();
}

}  // namespace

absl::string_view PurposeName(Purpose purpose) {
  switch (purpose) {
    case Purpose::kCare: return "CARE";
    case Purpose::kRemoteMonitoring: return "REMOTE_MONITORING";
    case Purpose::kRecordSharing: return "RECORD_SHARING";
    case Purpose::kResearch: return "RESEARCH";
    case Purpose::kGeolocation: return "GEOLOCATION";
  }
  return "UNSPECIFIED";
}

absl::string_view AccessReasonName(AccessReason reason) {
  switch (reason) {
    case AccessReason::kPermitted: return "PERMITTED";
    case AccessReason::kNoConsent: return "NO_CONSENT";
    case AccessReason::kRevoked: return "REVOKED";
    case AccessReason::kExpired: return "EXPIRED";
    case AccessReason::kActorNotCovered: return "ACTOR_NOT_COVERED";
    case AccessReason::kNotYetValid: return "NOT_YET_VALID";
    case AccessReason::kCategoryNotCovered: return "CATEGORY_NOT_COVERED";
  }
  return "NO_CONSENT";
}

std::optional<Purpose> PurposeFromNumber(int number) {
  for (Purpose p : kPurposes) {
    if (static_cast<int>(p) == number) return p;
  }
  return std::nullopt;
}

std::optional<Purpose> PurposeFromName(absl::string_view name) {
  for (Purpose p : kPurposes) {
    if (PurposeName(p) == name) return p;
  }
  return std::nullopt;
}

ConsentStatus StatusAt(const ConsentRecord& record, absl::Time now) {
  if (record.revoked) return ConsentStatus::kRevoked;
  if (now < record.valid_from) return ConsentStatus::kNotYetValid;
  if (now >= record.valid_until) return ConsentStatus::kExpired;
  return ConsentStatus::kGranted;
}

absl::Span<const absl::string_view> DataCategories() { return kCategories; }

absl::Span<const absl::string_view> RecordCategories() {
  return DataCategories().subspan(std::size(kCategories) - kRecordCategories);
}

bool IsDataCategory(absl::string_view name) {
  return std::find(std::begin(kCategories), std::end(kCategories), name) != std::end(kCategories);
}

absl::StatusOr<std::vector<std::string>> ValidateCategories(std::vector<std::string> categories,
                                                             absl::string_view field) {
  for (const std::string& category : categories) {
    if (!IsDataCategory(category)) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ": '", absl::CHexEscape(category.substr(0, 32)), "' is not a data category (",
          absl::StrJoin(kCategories, ", "), ")"));
    }
  }
  std::sort(categories.begin(), categories.end());
  if (auto twice = std::adjacent_find(categories.begin(), categories.end());
      twice != categories.end()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": '", *twice, "' is given twice"));
  }
  return categories;
}

bool CoversCategory(const ConsentRecord& record, absl::string_view category) {
  if (record.categories.empty()) return true;
  return !category.empty() && std::find(record.categories.begin(), record.categories.end(),
                                        category) != record.categories.end();
}

absl::string_view TenantOfActor(absl::string_view actor) {
  constexpr absl::string_view kScheme = "spiffe://";
  if (!absl::ConsumePrefix(&actor, kScheme)) return "";
  size_t slash = actor.find('/');
  if (slash == absl::string_view::npos || slash == 0) return "";
  actor.remove_prefix(slash + 1);
  if (!absl::ConsumePrefix(&actor, "tenant/")) return "";
  slash = actor.find('/');
  if (slash == absl::string_view::npos || slash == 0) return "";
  absl::string_view tenant = actor.substr(0, slash);
  absl::string_view rest = actor.substr(slash + 1);
  for (absl::string_view kind : {"device/", "practitioner/", "app/"}) {
    if (absl::ConsumePrefix(&rest, kind)) {
      return !rest.empty() && rest.find('/') == absl::string_view::npos ? tenant : "";
    }
  }
  return "";
}

AccessDecision Decide(absl::Span<const ConsentRecord> consents, Purpose purpose,
                      absl::string_view actor, absl::string_view category, absl::Time now) {
  const ConsentRecord* narrowed = nullptr;
  const ConsentRecord* tenant_wide = nullptr;
  bool any_for_purpose = false;
  for (const ConsentRecord& c : consents) {
    if (c.purpose != purpose) continue;
    any_for_purpose = true;
    if (c.actor.empty()) {
      // Parsed only here: most decisions never need the actor's tenant. No actor is no one of
      // the tenant: covered by nothing (default deny).
      const absl::string_view actor_tenant = TenantOfActor(actor);  // "" for ""
      if (!actor_tenant.empty() && actor_tenant == c.tenant_id) {
        tenant_wide = &c;
      }
    } else if (!actor.empty() && c.actor == actor) {
      narrowed = &c;
    }
  }
  AccessDecision decision;
  if (!any_for_purpose) {
    decision.reason = AccessReason::kNoConsent;
    return decision;
  }
  if (narrowed == nullptr && tenant_wide == nullptr) {
    decision.reason = AccessReason::kActorNotCovered;
    return decision;
  }
  const ConsentRecord* rests_on = nullptr;
  for (const ConsentRecord* c : {narrowed, tenant_wide}) {
    if (c == nullptr) continue;
    decision.valid_until = std::min(decision.valid_until, NextChange(*c, now));
    if (rests_on == nullptr && StatusAt(*c, now) == ConsentStatus::kGranted &&
        CoversCategory(*c, category)) {
      rests_on = c;
    }
  }
  if (rests_on != nullptr) {
    decision.reason = AccessReason::kPermitted;
  } else {
    rests_on = narrowed != nullptr ? narrowed : tenant_wide;
    const ConsentStatus status = StatusAt(*rests_on, now);
    decision.reason =
        status == ConsentStatus::kGranted ? AccessReason::kCategoryNotCovered : ReasonFor(status);
  }
  decision.permit = decision.reason == AccessReason::kPermitted;
  decision.consent_id = rests_on->consent_id;
  decision.consent_version = rests_on->version;
  return decision;
}

}  // namespace medgate::consent
