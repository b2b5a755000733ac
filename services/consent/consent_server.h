// Wiring of the consent service: shard pools, routing client, consent cache, core, gRPC service
// and server, from the configuration. main.cc and the integration tests start it the same way.
#ifndef MEDGATE_SERVICES_CONSENT_CONSENT_SERVER_H_
#define MEDGATE_SERVICES_CONSENT_CONSENT_SERVER_H_

#include <memory>

#include <grpcpp/channel.h>

#include "absl/status/statusor.h"
#include "libs/common/config.h"
#include "libs/consent_client/consent_cache.h"
#include "libs/pg/shard_set.h"
#include "libs/routing_client/routing_client.h"
#include "libs/routing_client/tenant_gate.h"
#include "libs/server/service_server.h"
#include "services/consent/consent_core.h"
#include "services/consent/consent_service.h"

namespace medgate::consent {

// The consent section of the configuration (every key optional):
//   consent:
//     cache: {max_patients, max_mib, max_staleness_ms, fail_closed_after_ms, load_timeout_ms}
struct ConsentSettings {
  ConsentCacheOptions cache;
};

absl::StatusOr<ConsentSettings> ParseConsentSettings(const MedgateConfig& config);

class ConsentServer {
 public:
  // Validates the configuration (regions, services.consent, services.routing) and builds the
  // service; the cache starts listening to every shard's change feed at once.
  static absl::StatusOr<std::unique_ptr<ConsentServer>> Create(const MedgateConfig& config);

  absl::Status Start();
  void Shutdown() { server_->Shutdown(); }
  void RunUntilSignal() { server_->RunUntilSignal(); }
  int port() const { return server_->port(); }
  ConsentCore& core() { return *core_; }
  ConsentCache& cache() { return *cache_; }

 private:
  ConsentServer(MedgateConfig config, ConsentSettings settings,
                std::shared_ptr<grpc::Channel> routing_channel);

  const MedgateConfig config_;  // connecting as the consent database role
  std::unique_ptr<pg::ShardSet> shards_;
  std::unique_ptr<RoutingClient> routing_;
  std::unique_ptr<TenantGate> tenant_gate_;
  std::unique_ptr<ConsentCache> cache_;
  std::unique_ptr<ConsentCore> core_;
  std::unique_ptr<ConsentService> service_;
  std::unique_ptr<ServiceServer> server_;
};

}  // namespace medgate::consent

#endif  // MEDGATE_SERVICES_CONSENT_CONSENT_SERVER_H_
