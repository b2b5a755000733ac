// The Audit gRPC adapter: identity and role check, proto <-> AuditCore values.
#ifndef MEDGATE_SERVICES_SHARING_AUDIT_SERVICE_H_
#define MEDGATE_SERVICES_SHARING_AUDIT_SERVICE_H_

#include <string>

#include "libs/identity/authz.h"
#include "medgate/v1/audit.grpc.pb.h"
#include "services/sharing/audit_core.h"

namespace medgate::sharing {

class AuditService final : public v1::Audit::Service {
 public:
  // `tenant_gate` (not owned) refuses the identities of suspended or unregistered tenants.
  AuditService(AuditCore& core, std::string trust_domain, TenantGate* tenant_gate);

  grpc::Status QueryAudit(grpc::ServerContext* context, const v1::QueryAuditRequest* request,
                          v1::QueryAuditResponse* response) override;
  grpc::Status VerifyChain(grpc::ServerContext* context, const v1::VerifyChainRequest* request,
                           v1::VerifyChainResponse* response) override;
  grpc::Status PatientDataReport(grpc::ServerContext* context,
                                 const v1::PatientDataReportRequest* request,
                                 v1::PatientDataReportResponse* response) override;
  grpc::Status RebaseAnchor(grpc::ServerContext* context, const v1::RebaseAnchorRequest* request,
                            v1::RebaseAnchorResponse* response) override;

 private:
  absl::StatusOr<CallContext> Begin(grpc::ServerContext* context, absl::string_view method,
                                    const std::string& request_id = "");

  AuditCore& core_;
  RpcPolicy policy_;
};

}  // namespace medgate::sharing

#endif  // MEDGATE_SERVICES_SHARING_AUDIT_SERVICE_H_
