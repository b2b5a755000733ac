// The Consent gRPC adapter.
#include "services/consent/consent_service.h"

#include "absl/strings/str_cat.h"
#include "libs/common/grpc_status.h"
#include "libs/common/status_macros.h"
#include "libs/server/rpc_util.h"
#include "services/consent/fhir_consent.h"

namespace medgate::consent {
namespace {

using K = PrincipalKind;

// An export reads every version of a patient's consents: it counts as this many calls against
// its tenant's call rate.
constexpr double kExportCalls = 10;

// The range google.protobuf.Timestamp allows: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
v1::AccessReason ToProto(AccessReason reason) {
  switch (reason) {
    case AccessReason::kPermitted: return v1::ACCESS_REASON_PERMITTED;
    case AccessReason::kNoConsent: return v1::ACCESS_REASON_NO_CONSENT;
    case AccessReason::kRevoked: return v1::ACCESS_REASON_REVOKED;
    case AccessReason::kExpired: return v1::ACCESS_REASON_EXPIRED;
    case AccessReason::kActorNotCovered: return v1::ACCESS_REASON_ACTOR_NOT_COVERED;
    case AccessReason::kNotYetValid: return v1::ACCESS_REASON_NOT_YET_VALID;
    case AccessReason::kCategoryNotCovered: return v1::ACCESS_REASON_CATEGORY_NOT_COVERED;
  }
  return v1::ACCESS_REASON_UNSPECIFIED;
}

v1::ConsentState ToProto(ConsentStatus status) {
  switch (status) {
    case ConsentStatus::kGranted:
    case ConsentStatus::kNotYetValid:  // granted; its period tells when it starts
      return v1::CONSENT_STATE_GRANTED;
    case ConsentStatus::kRevoked: return v1::CONSENT_STATE_REVOKED;
    case ConsentStatus::kExpired: return v1::CONSENT_STATE_EXPIRED;
  }
  return v1::CONSENT_STATE_UNSPECIFIED;
}

void ToProto(const VersionInfo& v, v1::ConsentVersion* out) {
  out->set_version(v.version);
  out->set_state(v.state == VersionState::kRevoked ? v1::CONSENT_STATE_REVOKED
                                                   : v1::CONSENT_STATE_GRANTED);
  *out->mutable_period()->mutable_start_at() = ToProtoTimestamp(v.valid_from);
  if (v.valid_until) *out->mutable_period()->mutable_end_at() = ToProtoTimestamp(*v.valid_until);
  out->set_evidence_ref(v.evidence_ref);
  out->set_reason(v.reason);
  out->set_recorded_by(v.recorded_by);
  *out->mutable_recorded_at() = ToProtoTimestamp(v.recorded_at);
  out->set_request_id(v.request_id);
  for (const std::string& category : v.categories) out->add_categories(category);
}

void ToProto(const ConsentInfo& c, v1::PatientConsent* out) {
  out->set_consent_id(c.consent_id);
  out->set_patient_id(c.patient_id);
  out->set_purpose(static_cast<v1::Purpose>(static_cast<int>(c.purpose)));
  out->set_actor(c.actor);
  out->set_state(ToProto(c.status));
  ToProto(c.current, out->mutable_current());
  for (const VersionInfo& v : c.history) ToProto(v, out->add_history());
}

}  // namespace

// Consents are recorded and read by the patient's tenant only: ops host the data and have no
// say in a patient's consent.
ConsentService::ConsentService(ConsentCore& core, std::string trust_domain,
                               TenantGate* tenant_gate,
                               const ServiceIdentities& service_identities)
    : core_(core),
      policy_(std::move(trust_domain),
              {{"GrantConsent", {K::kApp, K::kPractitioner}},
               {"RevokeConsent", {K::kApp, K::kPractitioner}},
               {"ListConsents", {K::kApp, K::kPractitioner}},
               // Services check on behalf of their callers, unaudited: only those that enforce
               // consent (ingest, sharing) may.
               {"CheckAccess", {K::kService, K::kApp, K::kPractitioner}, 1, {"ingest", "sharing"}},
               {"ExportConsents", {K::kApp}, kExportCalls}},
              service_identities) {
  policy_.set_tenant_gate(tenant_gate);
}

absl::StatusOr<CallContext> ConsentService::Begin(grpc::ServerContext* context,
                                                  absl::string_view method,
                                                  const std::string& request_id) {
  return BeginCall(policy_, *context, method, request_id);
}

grpc::Status ConsentService::GrantConsent(grpc::ServerContext* context,
                                          const v1::GrantConsentRequest* request,
                                          v1::GrantConsentResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "GrantConsent", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  GrantRequest grant;
  grant.patient_id = request->patient_id();
  grant.purpose = request->purpose();
  grant.actor = request->actor();
  if (request->period().has_start_at()) {
    absl::StatusOr<absl::Time> start = TimeFromProto(request->period().start_at(), "period.start_at");
    if (!start.ok()) return ToGrpcStatus(start.status());
    grant.period.start_at = *start;
  }
  if (request->period().has_end_at()) {
    absl::StatusOr<absl::Time> end = TimeFromProto(request->period().end_at(), "period.end_at");
    if (!end.ok()) return ToGrpcStatus(end.status());
    grant.period.end_at = *end;
  }
  grant.evidence_ref = request->evidence_ref();
  // Bounded before it is copied: no grant names more than every category.
  if (static_cast<size_t>(request->categories_size()) > DataCategories().size()) {
    return ToGrpcStatus(absl::InvalidArgumentError(
        absl::StrCat("categories: at most ", DataCategories().size(), " (each category once), got ",
                     request->categories_size())));
  }
  grant.categories.assign(request->categories().begin(), request->categories().end());
  absl::StatusOr<GrantResult> result = core_.Grant(*ctx, grant);
  if (!result.ok()) return ToGrpcStatus(result.status());
  response->set_consent_id(result->consent_id);
  response->set_version(result->version);
  return grpc::Status::OK;
}

grpc::Status ConsentService::RevokeConsent(grpc::ServerContext* context,
                                           const v1::RevokeConsentRequest* request,
                                           v1::RevokeConsentResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "RevokeConsent", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  RevokeRequest revoke;
  switch (request->target_case()) {
    case v1::RevokeConsentRequest::kConsentId: revoke.consent_id = request->consent_id(); break;
    case v1::RevokeConsentRequest::kKey:
      revoke.key =
          KeyRef{request->key().patient_id(), request->key().purpose(), request->key().actor()};
      break;
    case v1::RevokeConsentRequest::TARGET_NOT_SET: break;
  }
  revoke.reason = request->reason();
  absl::StatusOr<RevokeResult> result = core_.Revoke(*ctx, revoke);
  if (!result.ok()) return ToGrpcStatus(result.status());
  response->set_consent_id(result->consent_id);
  response->set_version(result->version);
  response->set_already_revoked(result->already_revoked);
  return grpc::Status::OK;
}

grpc::Status ConsentService::ListConsents(grpc::ServerContext* context,
                                          const v1::ListConsentsRequest* request,
                                          v1::ListConsentsResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "ListConsents", "");
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  ListRequest list;
  list.patient_id = request->patient_id();
  list.purpose = request->purpose();
  list.include_history = request->include_history();
  list.page_size = request->page_size();
  list.page_token = request->page_token();
  absl::StatusOr<ListResult> result = core_.List(*ctx, list);
  if (!result.ok()) return ToGrpcStatus(result.status());
  for (const ConsentInfo& c : result->consents) ToProto(c, response->add_consents());
  response->set_next_page_token(result->next_page_token);
  return grpc::Status::OK;
}

grpc::Status ConsentService::ExportConsents(grpc::ServerContext* context,
                                            const v1::ExportConsentsRequest* request,
                                            v1::ExportConsentsResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "ExportConsents", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  absl::StatusOr<ListResult> result = core_.Export(*ctx, request->patient_id(), request->reason(),
                                                   request->page_size(), request->page_token());
  if (!result.ok()) return ToGrpcStatus(result.status());
  std::string* ndjson = response->mutable_ndjson();
  uint32_t resources = 0;
  const absl::Time now = absl::Now();
  for (const ConsentInfo& c : result->consents) {
    for (const VersionInfo& v : c.history) {
      absl::StrAppend(ndjson, FhirConsentJson(c, v, now), "\n");
      ++resources;
    }
  }
  response->set_consent_count(static_cast<uint32_t>(ConsentsBegun(*result)));
  response->set_resource_count(resources);
  response->set_next_page_token(result->next_page_token);
  return grpc::Status::OK;
}

grpc::Status ConsentService::CheckAccess(grpc::ServerContext* context,
                                         const v1::CheckAccessRequest* request,
                                         v1::CheckAccessResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "CheckAccess", "");
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  absl::StatusOr<AccessDecision> decision =
      core_.CheckAccess(*ctx, {request->patient_id(), request->purpose(), request->actor(),
                               request->category()});
  if (!decision.ok()) return ToGrpcStatus(decision.status());
  response->set_decision(decision->permit ? v1::DECISION_PERMIT : v1::DECISION_DENY);
  response->set_reason(ToProto(decision->reason));
  response->set_consent_id(decision->consent_id);
  response->set_consent_version(decision->consent_version);
  if (decision->valid_until != absl::InfiniteFuture()) {
    *response->mutable_valid_until() = ToProtoTimestamp(decision->valid_until);
  }
  return grpc::Status::OK;
}

}  // namespace medgate::consent
