// PatientDirectory over routing and the control database.
#include "services/sharing/routing_directory.h"

#include <grpcpp/client_context.h>

#include "absl/strings/str_cat.h"
#include "libs/common/status_macros.h"
#include "libs/pg/sql_array.h"
#include "services/sharing/sql.h"

namespace medgate::sharing {

RoutingDirectory::RoutingDirectory(std::unique_ptr<RoutingClient> routing,
                                   std::shared_ptr<grpc::Channel> channel, pg::Pool& control,
                                   RoutingDirectoryOptions options)
    : routing_(std::move(routing)),
      stub_(v1::TenantRouting::NewStub(std::move(channel))),
      control_(control),
      options_(std::move(options)),
      rules_(options_.max_cached),
      tenants_(options_.max_cached) {}

absl::StatusOr<PatientHome> RoutingDirectory::Resolve(const std::string& patient_id) {
  ASSIGN_OR_RETURN(std::vector<PatientLocation> found, routing_->ResolvePatients({patient_id}));
  if (found.size() != 1 || !found[0].found) return absl::NotFoundError("patient not found");
  return PatientHome{found[0].patient_id, found[0].tenant_id, found[0].region_id,
                     found[0].territory};
}

absl::StatusOr<residency::ResidencyRule> RoutingDirectory::Rule(const std::string& territory) {
  {
    absl::MutexLock lock(&mu_);
    if (auto hit = rules_.Get(territory, options_.clock())) return *hit;
  }
  v1::ListResidencyRulesRequest request;
  request.add_territories(territory);
  v1::ListResidencyRulesResponse response;
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + options_.rpc_deadline));
  grpc::Status status = stub_->ListResidencyRules(&context, request, &response);
  if (!status.ok()) return RoutingCallError("ListResidencyRules", status);
  for (const v1::ResidencyRule& r : response.rules()) {
    if (r.territory() != territory) continue;
    residency::ResidencyRule rule;
    rule.territory = r.territory();
    rule.allowed_regions.assign(r.region_ids().begin(), r.region_ids().end());
    rule.readable_from.insert(r.readable_from_territories().begin(),
                              r.readable_from_territories().end());
    rule.version = r.version();
    absl::MutexLock lock(&mu_);
    rules_.Put(territory, rule, options_.ttl, options_.clock());
    return rule;
  }
  return absl::FailedPreconditionError(
      absl::StrCat("territory ", territory, " has no residency rule: its data cannot be read"));
}

absl::StatusOr<std::vector<std::string>> RoutingDirectory::TenantTerritories(
    const std::string& tenant_id) {
  {
    absl::MutexLock lock(&mu_);
    if (auto hit = tenants_.Get(tenant_id, options_.clock())) return *hit;
  }
  ASSIGN_OR_RETURN(std::vector<std::string> territories,
                   control_.TransactValue<std::vector<std::string>>(
                       [&](pqxx::work& txn) -> absl::StatusOr<std::vector<std::string>> {
                         pqxx::result rows =
                             txn.exec_prepared(sql::kSelectTenantTerritories, tenant_id);
                         if (rows.empty() || !rows[0][1].as<bool>()) {
                           return absl::FailedPreconditionError(absl::StrCat(
                               "tenant '", tenant_id, "' is not registered or not active"));
                         }
                         return pg::ParseTextArray(rows[0][0]);
                       }));
  absl::MutexLock lock(&mu_);
  tenants_.Put(tenant_id, territories, options_.ttl, options_.clock());
  return territories;
}

}  // namespace medgate::sharing
