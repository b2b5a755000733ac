// PatientDirectory over the routing service (placements, residency rules) and the control
// database's tenant table (territories served), with short-lived caches.
#ifndef MEDGATE_SERVICES_SHARING_ROUTING_DIRECTORY_H_
#define MEDGATE_SERVICES_SHARING_ROUTING_DIRECTORY_H_

#include <grpcpp/channel.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "libs/common/monotonic_clock.h"
#include "libs/pg/pool.h"
#include "libs/routing_client/routing_client.h"
#include "libs/common/ttl_cache.h"
#include "medgate/v1/routing.grpc.pb.h"
#include "services/sharing/patient_directory.h"

namespace medgate::sharing {

struct RoutingDirectoryOptions {
  // How long a rule or a tenant's territories are reused: a narrowed rule applies to reads
  // within this delay.
  absl::Duration ttl = absl::Seconds(10);
  absl::Duration rpc_deadline = absl::Seconds(2);
  size_t max_cached = 10000;
  // Times the caches only: monotonic, so a host clock stepped back does not keep a narrowed rule
  // or a suspended tenant's territories in use for as long as the step.
  std::function<absl::Time()> clock = MonotonicNow;
};

class RoutingDirectory final : public PatientDirectory {
 public:
  // `routing` resolves patients; `channel` is the same mTLS channel to routing (rules);
  // `control` must have been created with sql::ControlStatements().
  RoutingDirectory(std::unique_ptr<RoutingClient> routing, std::shared_ptr<grpc::Channel> channel,
                   pg::Pool& control, RoutingDirectoryOptions options = {});

  absl::StatusOr<PatientHome> Resolve(const std::string& patient_id) override;
  absl::StatusOr<residency::ResidencyRule> Rule(const std::string& territory) override;
  absl::StatusOr<std::vector<std::string>> TenantTerritories(const std::string& tenant_id) override;

 private:
  std::unique_ptr<RoutingClient> routing_;
  std::unique_ptr<v1::TenantRouting::Stub> stub_;
  pg::Pool& control_;
  const RoutingDirectoryOptions options_;
  absl::Mutex mu_;
  TtlCache<std::string, residency::ResidencyRule> rules_ ABSL_GUARDED_BY(mu_);
  TtlCache<std::string, std::vector<std::string>> tenants_ ABSL_GUARDED_BY(mu_);
};

}  // namespace medgate::sharing

#endif  // MEDGATE_SERVICES_SHARING_ROUTING_DIRECTORY_H_
