// The TenantRouting gRPC adapter.
#include "services/routing/routing_service.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "libs/common/config.h"
#include "libs/common/grpc_status.h"
#include "libs/common/status_macros.h"
#include "libs/common/validation.h"
#include "libs/residency/territory.h"
#include "libs/server/rpc_util.h"

namespace medgate::routing {
namespace {

using K = PrincipalKind;

constexpr int kDefaultPageSize = 100;
constexpr int kMaxPageSize = 1000;

void ToProto(const TenantInfo& t, v1::Tenant* out) {
  out->set_tenant_id(t.tenant_id);
  out->set_display_name(t.display_name);
  for (const auto& territory : t.territories) out->add_territories(territory);
  if (t.region_ids) {
    for (const auto& r : *t.region_ids) out->add_region_ids(r);
  }
  out->set_active(t.active);
  *out->mutable_created_at() = ToProtoTimestamp(t.created_at);
  *out->mutable_updated_at() = ToProtoTimestamp(t.updated_at);
  out->set_version(t.version);
}

void ToProto(const RuleInfo& r, v1::ResidencyRule* out) {
  out->set_territory(r.territory);
  for (const auto& id : r.region_ids) out->add_region_ids(id);
  for (const auto& t : r.readable_from) out->add_readable_from_territories(t);
  out->set_version(r.version);
  *out->mutable_updated_at() = ToProtoTimestamp(r.updated_at);
  out->set_updated_by(r.updated_by);
}

// Pages over a list sorted by key: the token is the last key of the previous page.
template <typename T, typename KeyFn, typename EmitFn>
std::string Paginate(const std::vector<T>& items, KeyFn key, const std::string& token, int size,
                     EmitFn emit) {
  int emitted = 0;
  std::string last;
  for (const T& item : items) {
    if (!token.empty() && key(item) <= token) continue;
    if (emitted == size) return last;
    emit(item);
    last = key(item);
    ++emitted;
  }
  return "";
}

}  // namespace

RoutingService::RoutingService(RoutingCore& core, std::string trust_domain,
                               TenantGateOptions tenant_gate,
                               const ServiceIdentities& service_identities)
    : core_(core),
      gate_(NewCachedTenantGate(
          [&core](absl::Span<const std::string> ids) { return core.ResolveTenants(ids); },
          std::move(tenant_gate))),
      policy_(std::move(trust_domain),
              {{"UpsertTenant", {K::kOps}},
               {"GetTenant", {K::kOps}},
               {"PutResidencyRule", {K::kOps}},
               // Each service reaches what its work needs: sharing places a record's copies by
               // the rules; ingest, consent and sharing find their patients and check their
               // callers' tenants; ingest alone finds a device's patient.
               {"ListResidencyRules", {K::kOps, K::kService}, 1, {"sharing"}},
               {"ListRegions", {K::kOps, K::kService}},
               {"PlacePatient", {K::kApp, K::kPractitioner}},
               {"AssignDevice", {K::kApp, K::kPractitioner}},
               {"UnassignDevice", {K::kApp, K::kPractitioner}},
               {"ResolvePatients", {K::kService}, 1, {"ingest", "consent", "sharing"}},
               {"ResolveDevices", {K::kService}, 1, {"ingest"}},
               {"ResolveTenants", {K::kService}, 1, {"ingest", "consent", "sharing"}}},
              service_identities) {
  policy_.set_tenant_gate(gate_.get());
}

absl::StatusOr<CallContext> RoutingService::Begin(grpc::ServerContext* context,
                                                  absl::string_view method,
                                                  const std::string& request_id) {
  return BeginCall(policy_, *context, method, request_id);
}

grpc::Status RoutingService::UpsertTenant(grpc::ServerContext* context,
                                          const v1::UpsertTenantRequest* request,
                                          v1::UpsertTenantResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "UpsertTenant", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  const v1::Tenant& in = request->tenant();
  TenantInfo tenant;
  tenant.tenant_id = in.tenant_id();
  tenant.display_name = in.display_name();
  tenant.territories.assign(in.territories().begin(), in.territories().end());
  if (in.region_ids_size() > 0) {
    tenant.region_ids = std::vector<std::string>(in.region_ids().begin(), in.region_ids().end());
  }
  tenant.active = in.active();
  absl::StatusOr<std::pair<TenantInfo, bool>> result =
      core_.UpsertTenant(*ctx, tenant,
                         RoutingCore::UpsertOptions{request->keep_placed_patients(),
                                                    request->expected_version(),
                                                    request->drop_region_narrowing()});
  if (!result.ok()) return ToGrpcStatus(result.status());
  ToProto(result->first, response->mutable_tenant());
  response->set_created(result->second);
  for (const RegionPatients& r : result->first.placed_outside) {
    v1::RegionPatients* out = response->add_placed_outside_narrowing();
    out->set_region_id(r.region_id);
    out->set_patients(r.patients);
  }
  for (const TerritoryPatients& t : result->first.patients_in_dropped_territories) {
    v1::TerritoryPatients* out = response->add_patients_in_dropped_territories();
    out->set_territory(t.territory);
    out->set_patients(t.patients);
  }
  return grpc::Status::OK;
}

grpc::Status RoutingService::GetTenant(grpc::ServerContext* context,
                                       const v1::GetTenantRequest* request,
                                       v1::GetTenantResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "GetTenant", "");
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  absl::StatusOr<TenantInfo> tenant = core_.GetTenant(*ctx, request->tenant_id());
  if (!tenant.ok()) return ToGrpcStatus(tenant.status());
  ToProto(*tenant, response->mutable_tenant());
  return grpc::Status::OK;
}

grpc::Status RoutingService::PutResidencyRule(grpc::ServerContext* context,
                                              const v1::PutResidencyRuleRequest* request,
                                              v1::PutResidencyRuleResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "PutResidencyRule", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  RuleInfo rule;
  rule.territory = request->rule().territory();
  rule.region_ids.assign(request->rule().region_ids().begin(), request->rule().region_ids().end());
  rule.readable_from.assign(request->rule().readable_from_territories().begin(),
                            request->rule().readable_from_territories().end());
  absl::StatusOr<RuleInfo> stored =
      core_.PutResidencyRule(*ctx, rule, request->expected_version(), /*only_if_absent=*/false,
                             request->keep_placed_patients());
  if (!stored.ok()) return ToGrpcStatus(stored.status());
  ToProto(*stored, response->mutable_rule());
  for (const RegionPatients& r : stored->placed_outside) {
    v1::RegionPatients* out = response->add_placed_outside_rule();
    out->set_region_id(r.region_id);
    out->set_patients(r.patients);
  }
  return grpc::Status::OK;
}

grpc::Status RoutingService::ListResidencyRules(grpc::ServerContext* context,
                                                const v1::ListResidencyRulesRequest* request,
                                                v1::ListResidencyRulesResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "ListResidencyRules", "");
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  absl::StatusOr<int> size = PageSize(request->page_size(), kDefaultPageSize, kMaxPageSize);
  if (!size.ok()) return ToGrpcStatus(size.status());
  // A token is the last territory of the page before: any other is not one this listing gave.
  if (!request->page_token().empty()) {
    if (!residency::ValidateTerritory(request->page_token(), "page_token").ok()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "page_token: not a token this listing gave");
    }
  }
  std::vector<std::string> filter(request->territories().begin(), request->territories().end());
  absl::StatusOr<std::vector<RuleInfo>> rules = core_.ListResidencyRules(filter);
  if (!rules.ok()) return ToGrpcStatus(rules.status());
  response->set_next_page_token(Paginate(
      *rules, [](const RuleInfo& r) { return r.territory; }, request->page_token(), *size,
      [&](const RuleInfo& r) { ToProto(r, response->add_rules()); }));
  return grpc::Status::OK;
}

grpc::Status RoutingService::ListRegions(grpc::ServerContext* context,
                                         const v1::ListRegionsRequest* request,
                                         v1::ListRegionsResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "ListRegions", "");
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  absl::StatusOr<int> size = PageSize(request->page_size(), kDefaultPageSize, kMaxPageSize);
  if (!size.ok()) return ToGrpcStatus(size.status());
  // A token is the last region id of the page before.
  if (!request->page_token().empty() &&
      !ValidateIdentifier(request->page_token(), "page_token", kMaxConfiguredRegionIdBytes).ok()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "page_token: not a token this listing gave");
  }
  std::vector<RegionInfo> regions = core_.ListRegions();
  std::sort(regions.begin(), regions.end(),
            [](const RegionInfo& a, const RegionInfo& b) { return a.region_id < b.region_id; });
  response->set_next_page_token(Paginate(
      regions, [](const RegionInfo& r) { return r.region_id; }, request->page_token(), *size,
      [&](const RegionInfo& r) {
        v1::Region* out = response->add_regions();
        out->set_region_id(r.region_id);
        for (const auto& t : r.territories) out->add_territories(t);
        if (r.checked_at == absl::Time()) {
          out->set_health(v1::REGION_HEALTH_UNSPECIFIED);
        } else {
          out->set_health(r.healthy ? v1::REGION_HEALTH_SERVING : v1::REGION_HEALTH_UNAVAILABLE);
          *out->mutable_health_checked_at() = ToProtoTimestamp(r.checked_at);
        }
      }));
  return grpc::Status::OK;
}

grpc::Status RoutingService::PlacePatient(grpc::ServerContext* context,
                                          const v1::PlacePatientRequest* request,
                                          v1::PlacePatientResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "PlacePatient", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  absl::StatusOr<PlaceResult> placed = core_.PlacePatient(*ctx, request->patient_ref(),
                                                          request->territory(), request->allow_move());
  if (!placed.ok()) return ToGrpcStatus(placed.status());
  response->set_patient_id(placed->patient_id);
  response->set_region_id(placed->region_id);
  response->set_territory(placed->territory);
  response->set_newly_placed(placed->newly_placed);
  response->set_residency_rule_version(placed->rule_version);
  return grpc::Status::OK;
}

grpc::Status RoutingService::ResolvePatients(grpc::ServerContext* context,
                                             const v1::ResolvePatientsRequest* request,
                                             v1::ResolvePatientsResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "ResolvePatients", "");
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  std::vector<std::string> ids(request->patient_ids().begin(), request->patient_ids().end());
  absl::StatusOr<std::vector<PatientLocation>> found = core_.ResolvePatients(ids);
  if (!found.ok()) return ToGrpcStatus(found.status());
  for (const PatientLocation& p : *found) {
    v1::ResolvedPatient* out = response->add_patients();
    out->set_patient_id(p.patient_id);
    out->set_found(p.found);
    out->set_tenant_id(p.tenant_id);
    out->set_region_id(p.region_id);
    out->set_territory(p.territory);
  }
  return grpc::Status::OK;
}

grpc::Status RoutingService::AssignDevice(grpc::ServerContext* context,
                                          const v1::AssignDeviceRequest* request,
                                          v1::AssignDeviceResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "AssignDevice", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  absl::StatusOr<AssignResult> result =
      core_.AssignDevice(*ctx, request->device_id(), request->patient_ref());
  if (!result.ok()) return ToGrpcStatus(result.status());
  response->set_device_id(result->device_id);
  response->set_patient_id(result->patient_id);
  response->set_region_id(result->region_id);
  response->set_newly_assigned(result->newly_assigned);
  return grpc::Status::OK;
}

grpc::Status RoutingService::UnassignDevice(grpc::ServerContext* context,
                                            const v1::UnassignDeviceRequest* request,
                                            v1::UnassignDeviceResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "UnassignDevice", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  absl::StatusOr<UnassignResult> result = core_.UnassignDevice(*ctx, request->device_id());
  if (!result.ok()) return ToGrpcStatus(result.status());
  response->set_device_id(result->device_id);
  response->set_patient_id(result->patient_id);
  response->set_was_assigned(result->was_assigned);
  return grpc::Status::OK;
}

grpc::Status RoutingService::ResolveDevices(grpc::ServerContext* context,
                                            const v1::ResolveDevicesRequest* request,
                                            v1::ResolveDevicesResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "ResolveDevices", "");
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  std::vector<DeviceRef> refs;
  for (const v1::DeviceKey& key : request->devices()) refs.push_back({key.tenant_id(), key.device_id()});
  absl::StatusOr<std::vector<DeviceLocation>> found = core_.ResolveDevices(refs);
  if (!found.ok()) return ToGrpcStatus(found.status());
  for (const DeviceLocation& d : *found) {
    v1::ResolvedDevice* out = response->add_devices();
    out->set_tenant_id(d.tenant_id);
    out->set_device_id(d.device_id);
    out->set_found(d.found);
    out->set_patient_id(d.patient_id);
    out->set_region_id(d.region_id);
    out->set_tenant_active(d.tenant_active);
    if (d.found && d.assigned_at != absl::InfinitePast()) {
      *out->mutable_assigned_at() = ToProtoTimestamp(d.assigned_at);
    }
  }
  return grpc::Status::OK;
}

grpc::Status RoutingService::ResolveTenants(grpc::ServerContext* context,
                                            const v1::ResolveTenantsRequest* request,
                                            v1::ResolveTenantsResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "ResolveTenants", "");
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  std::vector<std::string> ids(request->tenant_ids().begin(), request->tenant_ids().end());
  absl::StatusOr<std::vector<TenantStatus>> found = core_.ResolveTenants(ids);
  if (!found.ok()) return ToGrpcStatus(found.status());
  for (const TenantStatus& t : *found) {
    v1::ResolvedTenant* out = response->add_tenants();
    out->set_tenant_id(t.tenant_id);
    out->set_found(t.found);
    out->set_active(t.active);
  }
  return grpc::Status::OK;
}

}  // namespace medgate::routing
