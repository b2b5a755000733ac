// The consent logic over plain values: validation, tenant scoping through routing, append-only
// versions with their audit entries in the patient's home shard, and decisions from the cache.
#ifndef MEDGATE_SERVICES_CONSENT_CONSENT_CORE_H_
#define MEDGATE_SERVICES_CONSENT_CONSENT_CORE_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "libs/consent_client/consent_cache.h"
#include "libs/consent_client/consent_decision.h"
#include "libs/identity/principal.h"
#include "libs/server/rpc_util.h"
#include "libs/pg/shard_set.h"
#include "libs/routing_client/routing_client.h"

namespace medgate::consent {

using ::medgate::CallContext;  // who asks, for the audit entry (libs/server/rpc_util.h)

inline constexpr size_t kMaxIdBytes = 64;         // patient and consent ids (API convention)
inline constexpr size_t kMaxIdentityBytes = 512;  // SPIFFE ids (API convention)
inline constexpr size_t kMaxTextBytes = 512;      // evidence_ref, reason
inline constexpr int kDefaultPageSize = 100;
inline constexpr int kMaxPageSize = 1000;
// Bounds that keep a patient's consents, and a page of them, finite: at most this many consents
// narrowed to an actor (purpose and actor pairs) per patient, besides the tenant-wide ones (one a
// purpose), and consents per page when their history comes with them. A consent's versions are
// not bounded (a bound would lock a consent out once reached, and the tenant's call rate bounds
// how fast they grow): a page holds at most kMaxHistoryVersionsPerPage of them (about 2 KB a
// version at most, so about 2 MiB), and a consent with more ends its page and continues on the
// next.
inline constexpr int64_t kMaxConsentsPerPatient = 1000;
inline constexpr int kMaxPageSizeWithHistory = 10;
inline constexpr size_t kMaxHistoryVersionsPerPage = 1000;
// Consents per page of an export, and versions: a version's FHIR text is about 1.2 KB, at most
// about 5 KB, so a page stays under 2 MiB.
inline constexpr int kMaxExportPageSize = 4;
inline constexpr size_t kMaxExportVersionsPerPage = 400;
// Region ids are embedded in consent ids ("cn_<region>_<24 hex>", at most kMaxIdBytes).
inline constexpr size_t kMaxRegionIdBytes = kMaxIdBytes - 28;

// A validity period as given: unset start means from recording, unset end means until revoked.
struct Period {
  std::optional<absl::Time> start_at;
  std::optional<absl::Time> end_at;
};

struct GrantRequest {
  std::string patient_id;
  int purpose = 0;  // proto number, validated by the core
  std::string actor;
  Period period;
  std::string evidence_ref;
  std::vector<std::string> categories;  // empty: every category (ValidateCategories)
};

struct GrantResult {
  std::string consent_id;
  int64_t version = 0;
};

struct KeyRef {
  std::string patient_id;
  int purpose = 0;
  std::string actor;
};

struct RevokeRequest {
  // Exactly one of the two.
  std::optional<std::string> consent_id;
  std::optional<KeyRef> key;
  std::string reason;
};

struct RevokeResult {
  std::string consent_id;
  int64_t version = 0;
  bool already_revoked = false;
};

enum class VersionState { kGranted, kRevoked };

struct VersionInfo {
  int64_t version = 0;
  VersionState state = VersionState::kGranted;
  absl::Time valid_from;
  std::optional<absl::Time> valid_until;
  std::string evidence_ref;
  std::string reason;
  std::string recorded_by;
  absl::Time recorded_at;
  std::string request_id;
  std::vector<std::string> categories;  // sorted; empty: every category
};

struct ConsentInfo {
  std::string consent_id;
  std::string patient_id;
  Purpose purpose = Purpose::kCare;
  std::string actor;
  ConsentStatus status = ConsentStatus::kGranted;  // in effect when listed
  VersionInfo current;
  std::vector<VersionInfo> history;  // oldest first, when asked for
  // The history starts after versions listed on an earlier page (a consent whose history did
  // not fit there), and goes on on a later page (it did not fit on this one).
  bool continued = false;
  bool continues = false;
};

struct ListRequest {
  std::string patient_id;
  int purpose = 0;  // 0: every purpose
  bool include_history = false;
  int page_size = 0;
  std::string page_token;
};

struct ListResult {
  std::vector<ConsentInfo> consents;  // by purpose, then actor
  std::string next_page_token;
};

// The consents of a page that begin on it: all but one continued from the page before.
size_t ConsentsBegun(const ListResult& page);

struct CheckRequest {
  std::string patient_id;
  int purpose = 0;
  std::string actor;
  std::string category;  // "" for none in particular
};

class ConsentCore {
 public:
  // `shards` must have been created with sql::Statements().
  ConsentCore(RoutingClient& routing, const pg::ShardSet& shards, ConsentCache& cache,
              std::string trust_domain);

  absl::StatusOr<GrantResult> Grant(const CallContext& ctx, const GrantRequest& request);
  absl::StatusOr<RevokeResult> Revoke(const CallContext& ctx, const RevokeRequest& request);
  absl::StatusOr<ListResult> List(const CallContext& ctx, const ListRequest& request);
  absl::StatusOr<AccessDecision> CheckAccess(const CallContext& ctx, const CheckRequest& request);
  // A patient's consents with every version, for the patient's export (GDPR art. 20), by an app
  // of the patient's tenant (PERMISSION_DENIED for any other identity): a page of List with
  // history of at most kMaxExportPageSize consents (0: that many) and kMaxExportVersionsPerPage
  // versions, audited with `reason` ("EXPORTED: consents=N versions=M format=fhir-r4; REASON",
  // N not counting a consent continued from the page before).
  absl::StatusOr<ListResult> Export(const CallContext& ctx, const std::string& patient_id,
                                    const std::string& reason, int page_size,
                                    const std::string& page_token);

 private:
  // List's and Export's page, with at most `max_versions` versions of history, audited in the
  // read's transaction with `audit_reason` of it.
  absl::StatusOr<ListResult> ReadConsents(
      const CallContext& ctx, const ListRequest& request, size_t max_versions,
      const std::function<std::string(const ListResult&, std::optional<Purpose>)>& audit_reason);
  // The patient's location; NOT_FOUND (one message for unknown and other tenants' patients)
  // unless the caller is ops or a service, or of the patient's tenant.
  absl::StatusOr<PatientLocation> ResolvePatient(const CallContext& ctx,
                                                 const std::string& patient_id);
  absl::StatusOr<pg::Pool*> HomeShard(const PatientLocation& patient);
  // A practitioner reading what tells who treats the patient and which kinds of data they hold
  // (their consents, another actor's access) does so only while the patient's CARE consent
  // permits them for every data category: otherwise PERMISSION_DENIED saying `reading` and why,
  // after a deny entry in the home shard (`object_type`, the patient). OK for anyone else.
  absl::Status RequireCareOfPractitioner(const CallContext& ctx, const PatientLocation& patient,
                                         pg::Pool& shard, absl::Time now,
                                         absl::string_view object_type,
                                         absl::string_view reading);
  // The patient and key of a consent found by its (validated) id, with the same NOT_FOUND for
  // unknown ids and other tenants' consents.
  absl::StatusOr<std::pair<PatientLocation, KeyRef>> LocateById(const CallContext& ctx,
                                                                const std::string& consent_id);

  RoutingClient& routing_;
  const pg::ShardSet& shards_;
  ConsentCache& cache_;
  const std::string trust_domain_;
};

// Pure helpers, exposed for tests. Every error is INVALID_ARGUMENT naming the field.
absl::StatusOr<Purpose> ValidatePurpose(int number, absl::string_view field);
// Categories (already ValidateCategories'd) a consent for `purpose` may be narrowed to: none for
// GEOLOCATION, measures of vitals for REMOTE_MONITORING and RESEARCH, kinds of record for
// RECORD_SHARING, either for CARE.
absl::Status CheckCategoriesOfPurpose(Purpose purpose, const std::vector<std::string>& categories);
// The period a grant at `now` records: [start or now, end), microsecond precision; the end, if
// any, after a given start. Whether the end is still to come is Grant's to ask, once it knows the
// grant is not a retry of one recorded earlier.
absl::StatusOr<std::pair<absl::Time, std::optional<absl::Time>>> ValidateGrantPeriod(
    const Period& period, absl::Time now);

// Consent ids carry the home region, so one found by id is read from one shard only.
std::string NewConsentId(absl::string_view region_id);
std::optional<std::string> RegionOfConsentId(absl::string_view consent_id);
// Region ids that can be embedded in consent ids.
absl::Status ValidateRegionId(absl::string_view region_id);

// What a failed look-up of a patient's home region in routing (`failed`, RoutingCallError's) is
// answered: routing's answer about the request keeps its code (INVALID_ARGUMENT, NOT_FOUND,
// OUT_OF_RANGE, FAILED_PRECONDITION; RESOURCE_EXHAUSTED, which passes); routing refusing this
// service (PERMISSION_DENIED, UNAUTHENTICATED) is INTERNAL, a deployment's fault no retry mends;
// anything else (routing unreachable, too slow, failing) is UNAVAILABLE, worth a retry.
absl::Status PatientLookupError(const absl::Status& failed);

// Where a page of a patient's consents ends: after the consent (purpose, actor) or, when
// `after_version` is set, within that consent's history, after that version.
struct PageToken {
  Purpose purpose = Purpose::kCare;
  std::string actor;
  int64_t after_version = 0;
};
std::string EncodePageToken(const PageToken& token);
absl::StatusOr<PageToken> DecodePageToken(absl::string_view token);

}  // namespace medgate::consent

#endif  // MEDGATE_SERVICES_CONSENT_CONSENT_CORE_H_
