// The Consent gRPC adapter: identity and role check, proto <-> ConsentCore values.
#ifndef MEDGATE_SERVICES_CONSENT_CONSENT_SERVICE_H_
#define MEDGATE_SERVICES_CONSENT_CONSENT_SERVICE_H_

#include <string>

#include "libs/identity/authz.h"
#include "medgate/v1/consent.grpc.pb.h"
#include "services/consent/consent_core.h"

namespace medgate::consent {

class ConsentService final : public v1::Consent::Service {
 public:
  // `tenant_gate` (not owned; may be null in tests of the adapter alone) refuses the identities
  // of suspended or unregistered tenants.
  // `service_identities`: the services' identities the configuration names (services.NAME.identity).
  ConsentService(ConsentCore& core, std::string trust_domain, TenantGate* tenant_gate,
                 const ServiceIdentities& service_identities = {});

  grpc::Status GrantConsent(grpc::ServerContext* context, const v1::GrantConsentRequest* request,
                            v1::GrantConsentResponse* response) override;
  grpc::Status RevokeConsent(grpc::ServerContext* context, const v1::RevokeConsentRequest* request,
                             v1::RevokeConsentResponse* response) override;
  grpc::Status ListConsents(grpc::ServerContext* context, const v1::ListConsentsRequest* request,
                            v1::ListConsentsResponse* response) override;
  grpc::Status CheckAccess(grpc::ServerContext* context, const v1::CheckAccessRequest* request,
                           v1::CheckAccessResponse* response) override;
  grpc::Status ExportConsents(grpc::ServerContext* context,
                              const v1::ExportConsentsRequest* request,
                              v1::ExportConsentsResponse* response) override;

 private:
  // Authorizes the call and builds its audit context; request ids are bounded.
  absl::StatusOr<CallContext> Begin(grpc::ServerContext* context, absl::string_view method,
                                    const std::string& request_id);

  ConsentCore& core_;
  RpcPolicy policy_;
};

}  // namespace medgate::consent

#endif  // MEDGATE_SERVICES_CONSENT_CONSENT_SERVICE_H_
