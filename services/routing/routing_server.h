// Wiring of the routing service: pools, core, gRPC service and server, from the configuration.
// main.cc and the integration tests start the service the same way.
#ifndef MEDGATE_SERVICES_ROUTING_ROUTING_SERVER_H_
#define MEDGATE_SERVICES_ROUTING_ROUTING_SERVER_H_

#include <memory>

#include "absl/status/statusor.h"
#include "libs/common/config.h"
#include "libs/pg/pool.h"
#include "libs/pg/shard_set.h"
#include "libs/routing_client/reassign_window.h"
#include "libs/server/service_server.h"
#include "services/routing/routing_core.h"
#include "services/routing/routing_service.h"

namespace medgate::routing {

// The routing section of the configuration.
struct RoutingSettings {
  std::vector<RuleInfo> seed_rules;  // applied once per territory that has no rule yet
  // Longer than ingest.device_cache_ttl_seconds (30 s by default) on every ingest instance.
  absl::Duration device_reassign_wait = absl::Seconds(kDefaultDeviceReassignWaitSeconds);
};

absl::StatusOr<RoutingSettings> ParseRoutingSettings(const MedgateConfig& config);

class RoutingServer {
 public:
  // Validates the configuration (control_db, regions, services.routing) without connecting.
  static absl::StatusOr<std::unique_ptr<RoutingServer>> Create(const MedgateConfig& config);

  // Seeds rules (when the control DB is reachable; otherwise later) and starts serving.
  absl::Status Start();
  void Shutdown() { server_->Shutdown(); }
  void RunUntilSignal() { server_->RunUntilSignal(); }
  int port() const { return server_->port(); }
  RoutingCore& core() { return *core_; }

 private:
  RoutingServer(MedgateConfig config, RoutingSettings settings);
  absl::Status SeedIfNeeded();

  const MedgateConfig config_;  // connecting as the routing database role
  RoutingSettings settings_;
  std::unique_ptr<pg::Pool> control_;
  std::unique_ptr<pg::ShardSet> shards_;
  std::unique_ptr<RoutingCore> core_;
  std::unique_ptr<RoutingService> service_;
  std::unique_ptr<ServiceServer> server_;
  std::atomic<bool> seeded_{false};
};

}  // namespace medgate::routing

#endif  // MEDGATE_SERVICES_ROUTING_ROUTING_SERVER_H_
