// The consent logic: validation, tenant scoping, versioned writes with audit, cached decisions.
#include "services/consent/consent_core.h"

#include <openssl/rand.h>

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <tuple>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "libs/audit/audit_log.h"
#include "libs/common/status_macros.h"
#include "libs/common/validation.h"
#include "libs/pg/sql_array.h"
#include "libs/server/rpc_util.h"
#include "services/consent/sql.h"

namespace medgate::consent {
namespace {

// One message whether the patient is unknown or another tenant's: no enumeration.
constexpr char kPatientNotFound[] = "patient not found";
constexpr char kConsentNotFound[] = "consent not found";
constexpr absl::string_view kConsentIdPrefix = "cn_";
constexpr size_t kConsentIdRandomBytes = 12;

absl::Time TruncateToMicros(absl::Time t) { return absl::FromUnixMicros(absl::ToUnixMicros(t)); }

absl::string_view StateName(VersionState state) {
  return state == VersionState::kGranted ? "granted" : "revoked";
}

VersionInfo VersionFromRow(const pqxx::row& row, int first) {
  VersionInfo v;
  v.version = row[first].as<int64_t>();
  // Only a version recorded as granted grants: a state this code does not know (a later
  // migration's) reads as revoked, so that it fails closed.
  v.state = row[first + 1].as<std::string>() == "granted" ? VersionState::kGranted
                                                          : VersionState::kRevoked;
  v.valid_from = absl::FromUnixMicros(row[first + 2].as<int64_t>());
  if (!row[first + 3].is_null()) v.valid_until = absl::FromUnixMicros(row[first + 3].as<int64_t>());
  v.evidence_ref = row[first + 4].c_str();
  v.reason = row[first + 5].c_str();
  v.recorded_by = row[first + 6].c_str();
  v.recorded_at = absl::FromUnixMicros(row[first + 7].as<int64_t>());
  v.request_id = row[first + 8].c_str();
  v.categories = pg::ParseTextArray(row[first + 9]);
  return v;
}

// The record a decision reads, from a consent's latest version.
ConsentRecord RecordOf(const ConsentInfo& c) {
  ConsentRecord r;
  r.consent_id = c.consent_id;
  r.purpose = c.purpose;
  r.actor = c.actor;
  r.version = c.current.version;
  r.revoked = c.current.state == VersionState::kRevoked;
  r.valid_from = c.current.valid_from;
  r.valid_until = c.current.valid_until.value_or(absl::InfiniteFuture());
  r.categories = c.current.categories;
  return r;
}

absl::StatusOr<Principal> ParseActor(absl::string_view actor, absl::string_view field,
                                     absl::string_view trust_domain,
                                     std::initializer_list<PrincipalKind> kinds,
                                     absl::string_view kinds_text) {
  if (actor.size() > kMaxIdentityBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": at most ", kMaxIdentityBytes, " bytes, got ", actor.size()));
  }
  absl::StatusOr<Principal> principal = ParseSpiffeId(actor, trust_domain);
  if (!principal.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": not a SPIFFE id of this trust domain (", principal.status().message(), ")"));
  }
  if (std::find(kinds.begin(), kinds.end(), principal->kind) == kinds.end()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": must be ", kinds_text, " identity"));
  }
  return principal;
}

audit::Entry AuditFor(const CallContext& ctx, audit::Action action, const PatientLocation& patient,
                      const std::string& consent_id, Purpose purpose, int64_t version,
                      absl::string_view reason) {
  audit::Entry e;
  e.actor = ctx.principal.spiffe_id;
  e.tenant = patient.tenant_id;
  e.action = action;
  e.object_type = "consent";
  e.object_id = consent_id;
  e.patient_id = patient.patient_id;
  e.decision = audit::Decision::kPermit;
  e.reason = std::string(reason);
  e.purpose = std::string(PurposeName(purpose));
  e.consent_id = consent_id;
  e.consent_version = version;
  e.request_id = ctx.request_id;
  e.origin = ctx.origin;
  return e;
}

std::optional<VersionInfo> LatestVersion(pqxx::work& txn, const std::string& consent_id) {
  pqxx::result rows = txn.exec_prepared(sql::kLatestVersion, consent_id);
  if (rows.empty()) return std::nullopt;
  return VersionFromRow(rows[0], 0);
}

// Whose a consent is and what it is about.
struct StoredConsent {
  std::string tenant_id;
  KeyRef key;
};

absl::StatusOr<std::optional<StoredConsent>> ReadConsent(pqxx::work& txn,
                                                         const std::string& consent_id) {
  pqxx::result rows = txn.exec_prepared(sql::kSelectConsentById, consent_id);
  if (rows.empty()) return std::nullopt;
  std::optional<Purpose> purpose = PurposeFromName(rows[0][2].c_str());
  if (!purpose) return absl::DataLossError("stored consent has an unknown purpose");
  StoredConsent c;
  c.key.patient_id = rows[0][0].c_str();
  c.tenant_id = rows[0][1].c_str();
  c.key.purpose = static_cast<int>(*purpose);
  c.key.actor = rows[0][3].c_str();
  return c;
}

// OK unless the caller recorded another change under ctx.request_id in this shard: a version of
// another consent, or one of another kind than `state` (a grant's request id sent again with a
// revocation). A request id names one change: sent again, it is a retry of that change only.
// INVALID_ARGUMENT naming what it recorded, the caller's own change. (Changes in another region's
// shard, of patients homed there, are not seen.)
absl::Status CheckRequestIdNamesThisChange(pqxx::work& txn, const CallContext& ctx,
                                           const std::string& consent_id, VersionState state) {
  const pqxx::result other =
      txn.exec_prepared(sql::kOtherChangeByRequestId, ctx.principal.spiffe_id, ctx.request_id,
                        consent_id, std::string(StateName(state)));
  if (other.empty()) return absl::OkStatus();
  const std::string recorded = other[0][2].c_str();
  return absl::InvalidArgumentError(absl::StrCat(
      "request_id '", ctx.request_id, "' already recorded ",
      recorded == StateName(VersionState::kGranted) ? "a grant" : "a revocation", " (version ",
      other[0][1].c_str(), " of consent '", other[0][0].c_str(), "'); a request id names one "
      "change, and another change needs a new request_id"));
}

void InsertVersion(pqxx::work& txn, const std::string& consent_id, const VersionInfo& v) {
  std::string until = v.valid_until ? std::to_string(absl::ToUnixMicros(*v.valid_until)) : "";
  txn.exec_prepared0(sql::kInsertVersion, consent_id, v.version, std::string(StateName(v.state)),
                     absl::ToUnixMicros(v.valid_from), v.valid_until ? until.c_str() : nullptr,
                     v.evidence_ref, v.reason, v.recorded_by, absl::ToUnixMicros(v.recorded_at),
                     v.request_id, pg::TextArrayLiteral(v.categories));
}

}  // namespace

absl::StatusOr<Purpose> ValidatePurpose(int number, absl::string_view field) {
  if (number == 0) return absl::InvalidArgumentError(absl::StrCat(field, ": required"));
  std::optional<Purpose> purpose = PurposeFromNumber(number);
  if (!purpose) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": unknown purpose ", number));
  }
  return *purpose;
}

absl::Status CheckCategoriesOfPurpose(Purpose purpose, const std::vector<std::string>& categories) {
  auto is_record_kind = [](absl::string_view c) {
    return std::find(RecordCategories().begin(), RecordCategories().end(), c) !=
           RecordCategories().end();
  };
  for (const std::string& c : categories) {
    // What each purpose is checked for: a category none of its uses is of would make a consent
    // that permits nothing, which nobody means to grant.
    switch (purpose) {
      case Purpose::kGeolocation:
        return absl::InvalidArgumentError(
            "categories: a GEOLOCATION consent is about locations, the category of its own; it "
            "is not narrowed to data categories");
      case Purpose::kRemoteMonitoring:
      case Purpose::kResearch:  // research reads vitals (ReadVitals), never records
        if (is_record_kind(c)) {
          return absl::InvalidArgumentError(absl::StrCat(
              "categories: '", c, "' is a kind of record; a ", PurposeName(purpose),
              " consent covers vitals, narrowed by measure"));
        }
        break;
      case Purpose::kRecordSharing:
        if (!is_record_kind(c)) {
          return absl::InvalidArgumentError(absl::StrCat(
              "categories: '", c, "' is a measure of vitals; a RECORD_SHARING consent covers "
              "records, narrowed by kind (document, imaging, report)"));
        }
        break;
      case Purpose::kCare:
        break;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::pair<absl::Time, std::optional<absl::Time>>> ValidateGrantPeriod(
    const Period& period, absl::Time now) {
  const absl::Time start = TruncateToMicros(period.start_at.value_or(now));
  if (!period.end_at) return std::make_pair(start, std::optional<absl::Time>());
  const absl::Time end = TruncateToMicros(*period.end_at);
  // An end already past is refused once the grant is known not to be a retry (Grant): a retry
  // of one recorded before its end answers what was recorded.
  if (period.start_at && end <= start) {
    return absl::InvalidArgumentError(
        "period: end_at must be after start_at (the period is empty or inverted)");
  }
  return std::make_pair(start, std::optional<absl::Time>(end));
}

std::string NewConsentId(absl::string_view region_id) {
  unsigned char bytes[kConsentIdRandomBytes];
  // Without the CSPRNG the id would be stack bytes, perhaps another consent's: nothing is safe to
  // go on with (as every other use of it here).
  if (RAND_bytes(bytes, sizeof(bytes)) != 1) std::abort();
  return absl::StrCat(kConsentIdPrefix, region_id, "_",
                      absl::BytesToHexString(
                          absl::string_view(reinterpret_cast<const char*>(bytes), sizeof(bytes))));
}

std::optional<std::string> RegionOfConsentId(absl::string_view consent_id) {
  constexpr size_t kRandomHex = 2 * kConsentIdRandomBytes;
  if (!absl::ConsumePrefix(&consent_id, kConsentIdPrefix)) return std::nullopt;
  if (consent_id.size() < kRandomHex + 2) return std::nullopt;
  absl::string_view random = consent_id.substr(consent_id.size() - kRandomHex);
  for (char c : random) {
    if (!absl::ascii_isxdigit(static_cast<unsigned char>(c))) return std::nullopt;
  }
  consent_id.remove_suffix(kRandomHex);
  if (!absl::ConsumeSuffix(&consent_id, "_") || consent_id.empty()) return std::nullopt;
  return std::string(consent_id);
}

absl::Status ValidateRegionId(absl::string_view region_id) {
  return ValidateIdentifier(region_id, "region id", kMaxRegionIdBytes);
}

size_t ConsentsBegun(const ListResult& page) {
  return static_cast<size_t>(std::count_if(page.consents.begin(), page.consents.end(),
                                           [](const ConsentInfo& c) { return !c.continued; }));
}

// "PURPOSE/ACTOR", or "PURPOSE.VERSION/ACTOR" within a consent's history (actors hold '/').
std::string EncodePageToken(const PageToken& token) {
  return absl::WebSafeBase64Escape(absl::StrCat(
      static_cast<int>(token.purpose),
      token.after_version > 0 ? absl::StrCat(".", token.after_version) : std::string(), "/",
      token.actor));
}

absl::StatusOr<PageToken> DecodePageToken(absl::string_view token) {
  const absl::Status invalid =
      absl::InvalidArgumentError("page_token: not a token from a previous response");
  std::string raw;
  if (token.size() > 2 * kMaxIdentityBytes || !absl::WebSafeBase64Unescape(token, &raw)) {
    return invalid;
  }
  if (raw.find('/') == std::string::npos) return invalid;
  std::pair<absl::string_view, absl::string_view> parts =
      absl::StrSplit(raw, absl::MaxSplits('/', 1));
  std::pair<absl::string_view, absl::string_view> position =
      absl::StrSplit(parts.first, absl::MaxSplits('.', 1));
  PageToken decoded;
  int number = 0;
  if (!absl::SimpleAtoi(position.first, &number)) return invalid;
  std::optional<Purpose> purpose = PurposeFromNumber(number);
  if (!purpose) return invalid;
  decoded.purpose = *purpose;
  if (parts.first.find('.') != absl::string_view::npos &&
      (!absl::SimpleAtoi(position.second, &decoded.after_version) ||
       decoded.after_version <= 0)) {
    return invalid;
  }
  decoded.actor = std::string(parts.second);
  return decoded;
}

absl::Status PatientLookupError(const absl::Status& failed) {
  absl::StatusCode code;
  switch (failed.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kResourceExhausted:
      code = failed.code();
      break;
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kUnauthenticated:
      code = absl::StatusCode::kInternal;
      break;
    default:
      code = absl::StatusCode::kUnavailable;
      break;
  }
  return absl::Status(code,
                      absl::StrCat("cannot resolve the patient's home region: ", failed.message()));
}

ConsentCore::ConsentCore(RoutingClient& routing, const pg::ShardSet& shards, ConsentCache& cache,
                         std::string trust_domain)
    : routing_(routing), shards_(shards), cache_(cache), trust_domain_(std::move(trust_domain)) {}

absl::StatusOr<PatientLocation> ConsentCore::ResolvePatient(const CallContext& ctx,
                                                            const std::string& patient_id) {
  absl::StatusOr<std::vector<PatientLocation>> found =
      routing_.ResolvePatients(absl::MakeConstSpan(&patient_id, 1));
  if (!found.ok()) return PatientLookupError(found.status());
  if (found->size() != 1) return absl::InternalError("routing answered for another patient");
  PatientLocation& patient = found->front();
  if (!patient.found ||
      (ctx.principal.IsTenantScoped() && patient.tenant_id != ctx.principal.tenant)) {
    return absl::NotFoundError(kPatientNotFound);
  }
  return std::move(patient);
}

absl::StatusOr<pg::Pool*> ConsentCore::HomeShard(const PatientLocation& patient) {
  absl::StatusOr<pg::Pool*> shard = shards_.Get(patient.region_id);
  if (!shard.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the patient's home region ", patient.region_id,
        " is not configured in this consent service (its configuration is behind routing's)"));
  }
  return shard;
}

absl::StatusOr<GrantResult> ConsentCore::Grant(const CallContext& ctx,
                                               const GrantRequest& request) {
  RETURN_IF_ERROR(ValidateIdentifier(request.patient_id, "patient_id", kMaxIdBytes));
  ASSIGN_OR_RETURN(Purpose purpose, ValidatePurpose(request.purpose, "purpose"));
  std::optional<Principal> actor;
  if (!request.actor.empty()) {
    ASSIGN_OR_RETURN(actor, ParseActor(request.actor, "actor", trust_domain_,
                                       {PrincipalKind::kPractitioner, PrincipalKind::kApp},
                                       "a practitioner or app"));
  }
  const absl::Time now = TruncateToMicros(absl::Now());
  ASSIGN_OR_RETURN(auto period, ValidateGrantPeriod(request.period, now));
  RETURN_IF_ERROR(ValidateText(request.evidence_ref, "evidence_ref", kMaxTextBytes));
  ASSIGN_OR_RETURN(std::vector<std::string> categories,
                   ValidateCategories(request.categories, "categories"));
  RETURN_IF_ERROR(CheckCategoriesOfPurpose(purpose, categories));
  ASSIGN_OR_RETURN(PatientLocation patient, ResolvePatient(ctx, request.patient_id));
  if (actor && actor->tenant != patient.tenant_id) {
    return absl::InvalidArgumentError(
        "actor: must be a practitioner or app of the patient's tenant");
  }
  ASSIGN_OR_RETURN(pg::Pool * shard, HomeShard(patient));

  VersionInfo version;
  version.state = VersionState::kGranted;
  version.valid_from = period.first;
  version.valid_until = period.second;
  version.evidence_ref = request.evidence_ref;
  version.recorded_by = ctx.principal.spiffe_id;
  version.recorded_at = now;
  version.request_id = ctx.request_id;
  version.categories = categories;
  const std::string purpose_name(PurposeName(purpose));
  ASSIGN_OR_RETURN(
      GrantResult result,
      shard->TransactValue<GrantResult>([&](pqxx::work& txn) -> absl::StatusOr<GrantResult> {
        txn.exec_prepared(sql::kLockPatientConsents, patient.patient_id);
        const pqxx::result inserted =
            txn.exec_prepared(sql::kInsertConsent, NewConsentId(patient.region_id),
                              patient.patient_id, patient.tenant_id, purpose_name, request.actor);
        // Narrowed consents are bounded; a tenant-wide one (one a purpose) is always possible,
        // so no pile of narrowed ones can keep the patient from consenting tenant-wide.
        if (inserted.affected_rows() == 1 && !request.actor.empty() &&
            txn.exec_prepared1(sql::kCountPatientConsents, patient.patient_id)[0].as<int64_t>() >
                kMaxConsentsPerPatient) {
          return absl::ResourceExhaustedError(absl::StrCat(
              "the patient has ", kMaxConsentsPerPatient, " consents narrowed to an actor "
              "(purpose and actor pairs), the most a patient may have; re-grant an existing one, "
              "or grant tenant-wide (no actor), instead of adding another"));
        }
        pqxx::result row = txn.exec_prepared(sql::kLockConsentByKey, patient.patient_id,
                                             purpose_name, request.actor);
        if (row.empty()) return absl::InternalError("consent vanished after insert");
        GrantResult granted{row[0][0].c_str(), 1};
        RETURN_IF_ERROR(CheckRequestIdNamesThisChange(txn, ctx, granted.consent_id,
                                                      VersionState::kGranted));
        // A retry of a grant already recorded (same request id) records nothing new, even when
        // the consent was revoked since: a late retry must not undo the patient's withdrawal.
        if (pqxx::result earlier =
                txn.exec_prepared(sql::kVersionByRequestId, granted.consent_id, ctx.request_id,
                                  ctx.principal.spiffe_id,
                                  std::string(StateName(VersionState::kGranted)));
            !earlier.empty()) {
          VersionInfo recorded = VersionFromRow(earlier[0], 0);
          // A retry repeats the grant: the same evidence, categories and end, and the same start
          // if it gave one (without one, the start was the first call's time).
          const bool same = recorded.evidence_ref == request.evidence_ref &&
                            recorded.categories == categories &&
                            recorded.valid_until == period.second &&
                            (!request.period.start_at || recorded.valid_from == period.first);
          if (!same) {
            return absl::InvalidArgumentError(absl::StrCat(
                "request_id '", ctx.request_id, "' already recorded version ", recorded.version,
                " of consent '", granted.consent_id, "' with other evidence, categories or "
                "period; a new grant needs a new request_id"));
          }
          granted.version = recorded.version;
          return granted;
        }
        if (period.second && *period.second <= now) {
          return absl::InvalidArgumentError("period.end_at: must be in the future");
        }
        if (std::optional<VersionInfo> latest = LatestVersion(txn, granted.consent_id)) {
          granted.version = latest->version + 1;
        }
        version.version = granted.version;
        InsertVersion(txn, granted.consent_id, version);
        RETURN_IF_ERROR(audit::Append(txn, AuditFor(ctx,
                                                    granted.version == 1 ? audit::Action::kCreate
                                                                         : audit::Action::kUpdate,
                                                    patient, granted.consent_id, purpose,
                                                    granted.version,
                                                    categories.empty()
                                                        ? std::string("GRANTED")
                                                        : absl::StrCat("GRANTED: categories=",
                                                                       absl::StrJoin(categories,
                                                                                     ","))))
                            .status());
        return granted;
      }));
  // Our own answers reflect the change at once; other instances hear of it from the shard.
  cache_.Invalidate(patient.patient_id);
  return result;
}

absl::StatusOr<std::pair<PatientLocation, KeyRef>> ConsentCore::LocateById(
    const CallContext& ctx, const std::string& consent_id) {
  const absl::Status not_found = absl::NotFoundError(kConsentNotFound);
  std::optional<std::string> region = RegionOfConsentId(consent_id);
  if (!region) return not_found;
  absl::StatusOr<pg::Pool*> shard = shards_.Get(*region);
  if (!shard.ok()) return not_found;
  ASSIGN_OR_RETURN(std::optional<StoredConsent> row,
                   (*shard)->TransactValue<std::optional<StoredConsent>>(
                       [&](pqxx::work& txn) { return ReadConsent(txn, consent_id); }));
  if (!row || (ctx.principal.IsTenantScoped() && row->tenant_id != ctx.principal.tenant)) {
    return not_found;
  }
  absl::StatusOr<PatientLocation> patient = ResolvePatient(ctx, row->key.patient_id);
  if (!patient.ok()) {
    return patient.status().code() == absl::StatusCode::kNotFound ? not_found : patient.status();
  }
  // A patient moved since (or a directory that disagrees) makes this copy not the consent.
  if (patient->region_id != *region || patient->tenant_id != row->tenant_id) return not_found;
  return std::make_pair(*std::move(patient), std::move(row->key));
}

absl::StatusOr<RevokeResult> ConsentCore::Revoke(const CallContext& ctx,
                                                 const RevokeRequest& request) {
  if (request.consent_id.has_value() == request.key.has_value()) {
    return absl::InvalidArgumentError("target: exactly one of consent_id or key is required");
  }
  PatientLocation patient;
  KeyRef key;
  Purpose purpose = Purpose::kCare;
  if (request.key) {
    key = *request.key;
    RETURN_IF_ERROR(ValidateIdentifier(key.patient_id, "key.patient_id", kMaxIdBytes));
    ASSIGN_OR_RETURN(purpose, ValidatePurpose(key.purpose, "key.purpose"));
    // As Grant takes it: anything else names no consent (and a NUL would cut the id the
    // database compares to another one's).
    if (!key.actor.empty()) {
      RETURN_IF_ERROR(ParseActor(key.actor, "key.actor", trust_domain_,
                                 {PrincipalKind::kPractitioner, PrincipalKind::kApp},
                                 "a practitioner or app")
                          .status());
    }
    RETURN_IF_ERROR(ValidateText(request.reason, "reason", kMaxTextBytes));
    ASSIGN_OR_RETURN(patient, ResolvePatient(ctx, key.patient_id));
  } else {
    RETURN_IF_ERROR(ValidateIdentifier(*request.consent_id, "consent_id", kMaxIdBytes));
    RETURN_IF_ERROR(ValidateText(request.reason, "reason", kMaxTextBytes));
    ASSIGN_OR_RETURN(std::tie(patient, key), LocateById(ctx, *request.consent_id));
    purpose = *PurposeFromNumber(key.purpose);
  }
  ASSIGN_OR_RETURN(pg::Pool * shard, HomeShard(patient));
  const absl::Time now = TruncateToMicros(absl::Now());
  const std::string purpose_name(PurposeName(purpose));
  ASSIGN_OR_RETURN(
      RevokeResult result,
      shard->TransactValue<RevokeResult>([&](pqxx::work& txn) -> absl::StatusOr<RevokeResult> {
        pqxx::result row =
            txn.exec_prepared(sql::kLockConsentByKey, patient.patient_id, purpose_name, key.actor);
        if (row.empty()) return absl::NotFoundError(kConsentNotFound);
        RevokeResult revoked{row[0][0].c_str(), 0, false};
        if (request.consent_id && revoked.consent_id != *request.consent_id) {
          return absl::NotFoundError(kConsentNotFound);
        }
        RETURN_IF_ERROR(CheckRequestIdNamesThisChange(txn, ctx, revoked.consent_id,
                                                      VersionState::kRevoked));
        // A retry of a revocation already recorded (same request id) records nothing, even when
        // the consent was granted again since: a late retry must not undo the newer grant.
        if (pqxx::result earlier =
                txn.exec_prepared(sql::kVersionByRequestId, revoked.consent_id, ctx.request_id,
                                  ctx.principal.spiffe_id,
                                  std::string(StateName(VersionState::kRevoked)));
            !earlier.empty()) {
          const VersionInfo recorded = VersionFromRow(earlier[0], 0);
          if (recorded.reason != request.reason) {
            return absl::InvalidArgumentError(absl::StrCat(
                "request_id '", ctx.request_id, "' already recorded version ", recorded.version,
                " of consent '", revoked.consent_id, "' with another reason; a new revocation "
                "needs a new request_id"));
          }
          revoked.version = recorded.version;
          revoked.already_revoked = true;
          return revoked;
        }
        std::optional<VersionInfo> latest = LatestVersion(txn, revoked.consent_id);
        if (!latest) return absl::DataLossError("consent has no version");
        if (latest->state == VersionState::kRevoked) {
          revoked.version = latest->version;
          revoked.already_revoked = true;
          return revoked;
        }
        // The period and evidence of what is revoked stay on the revoked version.
        VersionInfo version = *latest;
        version.version = latest->version + 1;
        version.state = VersionState::kRevoked;
        version.reason = request.reason;
        version.recorded_by = ctx.principal.spiffe_id;
        version.recorded_at = now;
        version.request_id = ctx.request_id;
        InsertVersion(txn, revoked.consent_id, version);
        revoked.version = version.version;
        RETURN_IF_ERROR(
            // The code, then the reason the caller gave: what a patient or a DPO reads the
            // entry for.
            audit::Append(txn, AuditFor(ctx, audit::Action::kUpdate, patient, revoked.consent_id,
                                        purpose, version.version,
                                        request.reason.empty()
                                            ? std::string("REVOKED")
                                            : absl::StrCat("REVOKED: ", request.reason)))
                .status());
        return revoked;
      }));
  cache_.Invalidate(patient.patient_id);
  return result;
}

absl::StatusOr<ListResult> ConsentCore::List(const CallContext& ctx, const ListRequest& request) {
  return ReadConsents(ctx, request, kMaxHistoryVersionsPerPage,
                      [&](const ListResult& result, std::optional<Purpose> filter) {
                        return absl::StrCat(
                            "LISTED: count=", result.consents.size(),
                            request.include_history ? " with_history" : "",
                            filter ? absl::StrCat(" purpose=", PurposeName(*filter)) : "");
                      });
}

absl::StatusOr<ListResult> ConsentCore::Export(const CallContext& ctx,
                                               const std::string& patient_id,
                                               const std::string& reason, int page_size,
                                               const std::string& page_token) {
  RETURN_IF_ERROR(ValidateIdentifier(patient_id, "patient_id", kMaxIdBytes));
  RETURN_IF_ERROR(ValidateText(reason, "reason", kMaxTextBytes));
  if (ctx.principal.kind != PrincipalKind::kApp) {
    return absl::PermissionDeniedError("a patient's consents are exported by an app of its tenant");
  }
  ListRequest request;
  request.patient_id = patient_id;
  request.include_history = true;
  // A page's FHIR text stays well under the 4 MiB message bound: a version's line is about
  // 1.2 KB, at most about 5 KB (every text field at its longest).
  ASSIGN_OR_RETURN(request.page_size,
                   PageSize(page_size, kMaxExportPageSize, kMaxExportPageSize));
  request.page_token = page_token;
  return ReadConsents(ctx, request, kMaxExportVersionsPerPage,
                      [&](const ListResult& result, std::optional<Purpose>) {
                        size_t versions = 0;
                        for (const ConsentInfo& c : result.consents) versions += c.history.size();
                        return absl::StrCat("EXPORTED: consents=", ConsentsBegun(result),
                                            " versions=", versions, " format=fhir-r4; ", reason);
                      });
}

absl::StatusOr<ListResult> ConsentCore::ReadConsents(
    const CallContext& ctx, const ListRequest& request, size_t max_versions,
    const std::function<std::string(const ListResult&, std::optional<Purpose>)>& audit_reason) {
  RETURN_IF_ERROR(ValidateIdentifier(request.patient_id, "patient_id", kMaxIdBytes));
  std::optional<Purpose> filter;
  if (request.purpose != 0) {
    ASSIGN_OR_RETURN(filter, ValidatePurpose(request.purpose, "purpose"));
  }
  ASSIGN_OR_RETURN(const int page_size,
                   PageSize(request.page_size,
                            request.include_history ? kMaxPageSizeWithHistory : kDefaultPageSize,
                            request.include_history ? kMaxPageSizeWithHistory : kMaxPageSize));
  std::optional<PageToken> after;
  if (!request.page_token.empty()) {
    ASSIGN_OR_RETURN(after, DecodePageToken(request.page_token));
  }
  ASSIGN_OR_RETURN(PatientLocation patient, ResolvePatient(ctx, request.patient_id));
  ASSIGN_OR_RETURN(pg::Pool * shard, HomeShard(patient));
  const absl::Time now = absl::Now();
  // A patient's consents tell who treats the patient and which kinds of data they hold, as the
  // patient's audit trail; the tenant's apps, which ask for the patient, need no consent.
  RETURN_IF_ERROR(RequireCareOfPractitioner(ctx, patient, *shard, now, "consent_list",
                                            "reading this patient's consents"));
  return shard->TransactValue<ListResult>([&](pqxx::work& txn) -> absl::StatusOr<ListResult> {
    std::vector<ConsentInfo> all;
    for (const pqxx::row& row :
         txn.exec_prepared(sql::kListConsents, patient.patient_id,
                           filter ? std::string(PurposeName(*filter)) : std::string())) {
      ConsentInfo c;
      c.consent_id = row[0].c_str();
      c.patient_id = patient.patient_id;
      std::optional<Purpose> purpose = PurposeFromName(row[1].c_str());
      if (!purpose) return absl::DataLossError("stored consent has an unknown purpose");
      c.purpose = *purpose;
      c.actor = row[2].c_str();
      c.current = VersionFromRow(row, 3);
      c.status = StatusAt(RecordOf(c), now);
      all.push_back(std::move(c));
    }
    auto order = [](const ConsentInfo& c) {
      return std::make_pair(static_cast<int>(c.purpose), c.actor);
    };
    std::sort(all.begin(), all.end(),
              [&](const ConsentInfo& a, const ConsentInfo& b) { return order(a) < order(b); });
    std::optional<std::pair<int, std::string>> last_listed;
    if (after) last_listed.emplace(static_cast<int>(after->purpose), after->actor);
    ListResult result;
    size_t versions_left = max_versions;
    for (ConsentInfo& c : all) {
      // The consent the last page ended within is listed again, its history continued.
      const bool continued = request.include_history && after && after->after_version > 0 &&
                             order(c) == *last_listed;
      if (last_listed && order(c) <= *last_listed && !continued) continue;
      if (result.consents.size() == static_cast<size_t>(page_size) ||
          (request.include_history && versions_left == 0)) {
        const ConsentInfo& last = result.consents.back();
        result.next_page_token = EncodePageToken({last.purpose, last.actor, 0});
        break;
      }
      if (request.include_history) {
        const int64_t from = continued ? after->after_version : 0;
        // One more than fits tells whether the history goes on.
        for (const pqxx::row& row :
             txn.exec_prepared(sql::kListVersions, c.consent_id, from,
                               static_cast<int64_t>(versions_left) + 1)) {
          c.history.push_back(VersionFromRow(row, 0));
        }
        if (continued && c.history.empty()) continue;  // nothing after the token's version
        c.continued = continued;
        if (c.history.size() > versions_left) {
          c.history.resize(versions_left);
          c.continues = true;
          result.next_page_token =
              EncodePageToken({c.purpose, c.actor, c.history.back().version});
          result.consents.push_back(std::move(c));
          break;
        }
        versions_left -= c.history.size();
      }
      result.consents.push_back(std::move(c));
    }
    // Reading a patient's consents is an access to the patient's data: audited, with the read.
    audit::Entry entry;
    entry.actor = ctx.principal.spiffe_id;
    entry.tenant = patient.tenant_id;
    entry.action = audit::Action::kRead;
    entry.object_type = "consent_list";
    entry.object_id = patient.patient_id;
    entry.patient_id = patient.patient_id;
    entry.decision = audit::Decision::kPermit;
    entry.reason = audit_reason(result, filter);
    entry.request_id = ctx.request_id;
    entry.origin = ctx.origin;
    RETURN_IF_ERROR(audit::Append(txn, entry).status());
    return result;
  });
}

absl::Status ConsentCore::RequireCareOfPractitioner(const CallContext& ctx,
                                                    const PatientLocation& patient,
                                                    pg::Pool& shard, absl::Time now,
                                                    absl::string_view object_type,
                                                    absl::string_view reading) {
  if (ctx.principal.kind != PrincipalKind::kPractitioner) return absl::OkStatus();
  ASSIGN_OR_RETURN(const AccessDecision care,
                   cache_.Check(patient.region_id, patient.patient_id, Purpose::kCare,
                                ctx.principal.spiffe_id, "", now));
  if (care.permit) return absl::OkStatus();
  audit::Entry entry = AuditFor(ctx, audit::Action::kRead, patient, care.consent_id,
                                Purpose::kCare, care.consent_version,
                                AccessReasonName(care.reason));
  entry.object_type = std::string(object_type);
  entry.object_id = patient.patient_id;
  entry.decision = audit::Decision::kDeny;
  RETURN_IF_ERROR(shard.Transact([&](pqxx::work& txn) { return audit::Append(txn, entry).status(); }));
  return absl::PermissionDeniedError(absl::StrCat(
      reading, ": the patient's CARE consent does not permit it (", AccessReasonName(care.reason),
      "); a practitioner does so under a CARE consent covering every data category, the "
      "tenant's apps for the patient"));
}

absl::StatusOr<AccessDecision> ConsentCore::CheckAccess(const CallContext& ctx,
                                                        const CheckRequest& request) {
  RETURN_IF_ERROR(ValidateIdentifier(request.patient_id, "patient_id", kMaxIdBytes));
  ASSIGN_OR_RETURN(Purpose purpose, ValidatePurpose(request.purpose, "purpose"));
  if (request.actor.empty()) return absl::InvalidArgumentError("actor: required");
  if (!request.category.empty()) {
    RETURN_IF_ERROR(ValidateCategories({request.category}, "category").status());
  }
  RETURN_IF_ERROR(
      ParseActor(request.actor, "actor", trust_domain_,
                 {PrincipalKind::kPractitioner, PrincipalKind::kApp, PrincipalKind::kDevice},
                 "a practitioner, app or device")
          .status());
  ASSIGN_OR_RETURN(PatientLocation patient, ResolvePatient(ctx, request.patient_id));
  const absl::Time now = absl::Now();
  // A practitioner checks their own access freely; another's tells who treats the patient, or
  // may, and for which kinds of data: as the patient's consents, under CARE.
  if (ctx.principal.kind == PrincipalKind::kPractitioner &&
      request.actor != ctx.principal.spiffe_id) {
    ASSIGN_OR_RETURN(pg::Pool * shard, HomeShard(patient));
    RETURN_IF_ERROR(RequireCareOfPractitioner(ctx, patient, *shard, now, "consent_decision",
                                              "checking another actor's access to this patient"));
  }
  ASSIGN_OR_RETURN(AccessDecision decision,
                   cache_.Check(patient.region_id, patient.patient_id, purpose, request.actor,
                                request.category, now));
  // A service asks before an access of its own, which its audit entry records with the decision.
  // A practitioner or app asking reads the patient's consent: audited in the patient's home shard
  // before the answer is given (no entry, no answer).
  if (ctx.principal.IsTenantScoped()) {
    ASSIGN_OR_RETURN(pg::Pool * shard, HomeShard(patient));
    audit::Entry entry = AuditFor(
        ctx, audit::Action::kRead, patient, decision.consent_id, purpose, decision.consent_version,
        absl::StrCat("CHECKED: ", decision.permit ? "PERMIT " : "DENY ",
                     AccessReasonName(decision.reason), " actor=", request.actor,
                     request.category.empty() ? "" : absl::StrCat(" category=", request.category)));
    entry.object_type = "consent_decision";
    entry.object_id = decision.consent_id.empty() ? patient.patient_id : decision.consent_id;
    RETURN_IF_ERROR(shard->Transact([&](pqxx::work& txn) {
      return audit::Append(txn, entry).status();
    }));
  }
  return decision;
}

}  // namespace medgate::consent
