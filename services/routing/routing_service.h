// The TenantRouting gRPC adapter: identity and role check, proto <-> RoutingCore values.
#ifndef MEDGATE_SERVICES_ROUTING_ROUTING_SERVICE_H_
#define MEDGATE_SERVICES_ROUTING_ROUTING_SERVICE_H_

#include <memory>

#include "libs/identity/authz.h"
#include "libs/routing_client/tenant_gate.h"
#include "medgate/v1/routing.grpc.pb.h"
#include "services/routing/routing_core.h"

namespace medgate::routing {

class RoutingService final : public v1::TenantRouting::Service {
 public:
  // `tenant_gate` decides for routing's own callers, from the control database.
  // `service_identities`: the services' identities the configuration names (services.NAME.identity).
  RoutingService(RoutingCore& core, std::string trust_domain, TenantGateOptions tenant_gate = {},
                 const ServiceIdentities& service_identities = {});

  grpc::Status UpsertTenant(grpc::ServerContext* context, const v1::UpsertTenantRequest* request,
                            v1::UpsertTenantResponse* response) override;
  grpc::Status GetTenant(grpc::ServerContext* context, const v1::GetTenantRequest* request,
                         v1::GetTenantResponse* response) override;
  grpc::Status PutResidencyRule(grpc::ServerContext* context,
                                const v1::PutResidencyRuleRequest* request,
                                v1::PutResidencyRuleResponse* response) override;
  grpc::Status ListResidencyRules(grpc::ServerContext* context,
                                  const v1::ListResidencyRulesRequest* request,
                                  v1::ListResidencyRulesResponse* response) override;
  grpc::Status ListRegions(grpc::ServerContext* context, const v1::ListRegionsRequest* request,
                           v1::ListRegionsResponse* response) override;
  grpc::Status PlacePatient(grpc::ServerContext* context, const v1::PlacePatientRequest* request,
                            v1::PlacePatientResponse* response) override;
  grpc::Status ResolvePatients(grpc::ServerContext* context,
                               const v1::ResolvePatientsRequest* request,
                               v1::ResolvePatientsResponse* response) override;
  grpc::Status AssignDevice(grpc::ServerContext* context, const v1::AssignDeviceRequest* request,
                            v1::AssignDeviceResponse* response) override;
  grpc::Status UnassignDevice(grpc::ServerContext* context,
                              const v1::UnassignDeviceRequest* request,
                              v1::UnassignDeviceResponse* response) override;
  grpc::Status ResolveDevices(grpc::ServerContext* context,
                              const v1::ResolveDevicesRequest* request,
                              v1::ResolveDevicesResponse* response) override;
  grpc::Status ResolveTenants(grpc::ServerContext* context,
                              const v1::ResolveTenantsRequest* request,
                              v1::ResolveTenantsResponse* response) override;

 private:
  // Authorizes the call and builds its audit context; request ids are bounded.
  absl::StatusOr<CallContext> Begin(grpc::ServerContext* context, absl::string_view method,
                                    const std::string& request_id);

  RoutingCore& core_;
  const std::unique_ptr<TenantGate> gate_;
  RpcPolicy policy_;
};

}  // namespace medgate::routing

#endif  // MEDGATE_SERVICES_ROUTING_ROUTING_SERVICE_H_
